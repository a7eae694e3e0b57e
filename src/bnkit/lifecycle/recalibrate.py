def recalibrate(model, batches, num_batches=None, progress=True):
    raise NotImplementedError
