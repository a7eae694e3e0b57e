"""Real networks with batch norms beyond classification (issue 19), in one place, for the tests and
benchmarks/convert_cpu.py: video (torchvision's 3-D ResNets and S3D, a Keras 3-D U-Net), segmentation
(torchvision's LR-ASPP, FCN, DeepLabV3 with dict outputs; a Keras U-Net and DeepLab-style model),
sequence models (a PyTorch CRNN and LSTM tagger, a Keras Conv1D/LSTM/GRU net), a detection backbone
(torchvision resnet50 with ``FrozenBatchNorm2d``), attention (torchvision ViTs, a Keras transformer block
with a BN stem) and a Keras ``channels_first`` CNN. Random weights, every normalization randomised
(:func:`real_networks.randomize_normalization`); measured by :func:`real_networks.check_network`.

:data:`BEYOND` holds them all. :data:`BENCHMARK_ONLY` names those measured by the benchmark only (too
slow for the suite), :data:`EXPECTED_REFUSALS` those bnkit refuses, each naming the operation.
"""

from __future__ import annotations

import torch
from real_networks import Network, randomize_normalization, torchvision_model
from torch import nn

from bnkit.keras import keras
from conftest import import_torchvision

L = keras.layers

# ---- video (3-D) --------------------------------------------------------------------------------


def torchvision_video_model(name: str, shape: tuple[int, int, int, int] = (3, 4, 32, 32), **kwargs) -> Network:
    """``torchvision.models.video.<name>`` with random weights, 10 classes and a ``(C, T, H, W)`` clip."""

    def build():
        torchvision = import_torchvision()
        torch.manual_seed(0)
        module = getattr(torchvision.models.video, name)(weights=None, num_classes=10, **kwargs)
        randomize_normalization(module)
        return module.eval()

    return Network(name, "torch", build, shape)


def keras_unet3d(shape: tuple[int, int, int, int] = (8, 16, 16, 2)) -> Network:
    """A small Keras 3-D U-Net-style classifier: Conv3D + BN + ReLU blocks, MaxPooling3D, a
    Conv3DTranspose upsampling concatenated with the skip, GlobalAveragePooling3D and Dense."""

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input(shape)

        def block(x, filters, name):
            x = L.Conv3D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
            x = L.BatchNormalization(name=f"{name}_bn")(x)
            return L.ReLU(name=f"{name}_relu")(x)

        skip = block(block(inputs, 8, "enc1a"), 8, "enc1b")
        x = L.MaxPooling3D(2, name="pool1")(skip)
        x = block(x, 16, "enc2")
        x = L.MaxPooling3D((1, 2, 2), padding="same", name="pool2")(x)
        x = block(x, 32, "bottom")
        x = L.Conv3DTranspose(16, (1, 2, 2), strides=(1, 2, 2), name="up2")(x)
        x = L.Conv3DTranspose(8, 3, strides=2, padding="same", name="up1")(x)
        x = L.Concatenate(name="skip1")([x, skip])
        x = L.Conv3D(8, 3, padding="same", activation="relu", name="dec1_conv")(x)
        x = L.BatchNormalization(momentum=0.9, epsilon=1e-5, name="dec1_bn")(x)
        x = L.GlobalAveragePooling3D(name="gap")(x)
        outputs = L.Dense(10, name="head")(x)
        model = keras.Model(inputs, outputs, name="unet3d")
        randomize_normalization(model)
        return model

    return Network("unet3d", "keras", build, shape)


# Clips are the smallest the video models take comfortably: (3, 4, 32, 32) leaves layer4 of the ResNets
# 1x1x1 per sample. torchvision's s3d needs (3, 13, 209, 209) (its AvgPool3d((2, 7, 7)) runs on features
# 32x smaller): ~40 s on two cores, so it is measured in the benchmark only.
VIDEO_NETWORKS = {
    net.name: net
    for net in [
        torchvision_video_model("r3d_18"),
        torchvision_video_model("mc3_18"),
        torchvision_video_model("r2plus1d_18"),
        keras_unet3d(),
    ]
}
S3D = torchvision_video_model("s3d", (3, 13, 209, 209))

# ---- segmentation and resizing ------------------------------------------------------------------

SEGMENTATION_SIZE = 64


def torchvision_segmentation(name: str, size: int = SEGMENTATION_SIZE, **kwargs) -> Network:
    """``torchvision.models.segmentation.<name>`` with random weights, 5 classes, a ``size``×``size`` input."""

    def build():
        torchvision = import_torchvision()
        torch.manual_seed(0)
        module = getattr(torchvision.models.segmentation, name)(
            weights=None, weights_backbone=None, num_classes=5, **kwargs
        )
        randomize_normalization(module)
        return module.eval()

    return Network(name, "torch", build, (3, size, size))


def _conv_bn_relu(x, filters, kernel=3, strides=1, dilation=1, name=""):
    x = L.Conv2D(
        filters, kernel, strides=strides, dilation_rate=dilation, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x)


def keras_unet(size: int = SEGMENTATION_SIZE) -> Network:
    """A small U-Net: Conv2D+BN+ReLU encoder, MaxPooling2D, UpSampling2D(bilinear) + Concatenate decoder."""

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((size, size, 3))
        e1 = _conv_bn_relu(_conv_bn_relu(inputs, 8, name="enc1a"), 8, name="enc1b")
        e2 = _conv_bn_relu(_conv_bn_relu(L.MaxPooling2D(name="pool1")(e1), 16, name="enc2a"), 16, name="enc2b")
        mid = _conv_bn_relu(L.MaxPooling2D(name="pool2")(e2), 32, name="mid")
        d2 = L.UpSampling2D(2, interpolation="bilinear", name="up2")(mid)
        d2 = _conv_bn_relu(L.Concatenate(name="cat2")([d2, e2]), 16, name="dec2")
        d1 = L.UpSampling2D(2, interpolation="bilinear", name="up1")(d2)
        d1 = _conv_bn_relu(L.Concatenate(name="cat1")([d1, e1]), 8, name="dec1")
        model = keras.Model(inputs, L.Conv2D(5, 1, name="logits")(d1), name="unet")
        randomize_normalization(model)
        return model

    return Network("keras_unet", "keras", build, (size, size, 3))


def keras_deeplab(size: int = SEGMENTATION_SIZE) -> Network:
    """DeepLab-style: strided stem, ASPP (1x1, dilated 3x3 at rates 2 and 4, global pooling resized back
    with Resizing), 1x1 projection, logits upsampled to the input with UpSampling2D(bilinear)."""

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((size, size, 3))
        x = _conv_bn_relu(inputs, 16, strides=2, name="stem1")
        x = _conv_bn_relu(x, 32, strides=2, name="stem2")
        features = size // 4
        branches = [
            _conv_bn_relu(x, 16, kernel=1, name="aspp0"),
            _conv_bn_relu(x, 16, dilation=2, name="aspp1"),
            _conv_bn_relu(x, 16, dilation=4, name="aspp2"),
        ]
        pooled = L.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)
        pooled = _conv_bn_relu(pooled, 16, kernel=1, name="aspp_pool_proj")
        branches.append(L.Resizing(features, features, interpolation="bilinear", name="aspp_pool_resize")(pooled))
        x = _conv_bn_relu(L.Concatenate(name="aspp_cat")(branches), 16, kernel=1, name="project")
        logits = L.Conv2D(5, 1, name="logits")(x)
        model = keras.Model(inputs, L.UpSampling2D(4, interpolation="bilinear", name="upsample")(logits))
        randomize_normalization(model)
        return model

    return Network("keras_deeplab", "keras", build, (size, size, 3))


SEGMENTATION_NETWORKS = {
    net.name: net
    for net in [
        torchvision_segmentation("lraspp_mobilenet_v3_large"),
        torchvision_segmentation("fcn_resnet50", aux_loss=True),
        torchvision_segmentation("deeplabv3_mobilenet_v3_large", aux_loss=True),
        keras_unet(),
        keras_deeplab(),
    ]
}

# ---- recurrent ----------------------------------------------------------------------------------


class CRNN(nn.Module):
    """A speech/OCR-style CRNN: two Conv1d + BatchNorm1d + ReLU blocks over (N, mel bins, frames), a
    2-layer bidirectional GRU over the frames, a Linear on the last frame."""

    def __init__(self, bins: int = 16, channels: int = 32, hidden: int = 24, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(bins, channels, 3, padding=1, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(inplace=True),
        )
        self.gru = nn.GRU(channels, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        x = self.features(x).permute(0, 2, 1)  # (N, frames, channels)
        out, _ = self.gru(x)
        return self.classifier(self.dropout(out[:, -1]))


class LSTMTagger(nn.Module):
    """A sequence tagger: BatchNorm1d over (N, features, steps), a bidirectional LSTM, per-step tag logits."""

    def __init__(self, features: int = 12, hidden: int = 16, tags: int = 7) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(features)
        self.lstm = nn.LSTM(features, hidden, batch_first=True, bidirectional=True)
        self.tagger = nn.Linear(2 * hidden, tags)

    def forward(self, x):
        out, _ = self.lstm(self.norm(x).transpose(1, 2))
        return self.tagger(out)  # (N, steps, tags)


def torch_sequence_model(name: str, cls, input_shape) -> Network:
    def build():
        torch.manual_seed(0)
        module = cls()
        randomize_normalization(module)
        return module.eval()

    return Network(name, "torch", build, input_shape)


def keras_conv_lstm_gru(steps: int = 24, channels: int = 8) -> Network:
    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((steps, channels))
        x = L.Conv1D(16, 3, padding="same", use_bias=False)(inputs)
        x = L.ReLU()(L.BatchNormalization()(x))
        x = L.Bidirectional(L.LSTM(12, return_sequences=True), name="bilstm")(x)
        x = L.GRU(10, name="gru")(x)
        model = keras.Model(inputs, L.Dense(5)(x), name="conv_lstm_gru")
        randomize_normalization(model)
        return model

    return Network("conv_lstm_gru", "keras", build, (steps, channels))


SEQUENCE_NETWORKS = [
    torch_sequence_model("crnn", CRNN, (16, 24)),
    torch_sequence_model("lstm_tagger", LSTMTagger, (12, 20)),
    keras_conv_lstm_gru(),
]

# ---- attention ----------------------------------------------------------------------------------


def small_vision_transformer() -> Network:
    def build():
        import_torchvision()
        from torchvision.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        module = VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        )
        with torch.no_grad():  # torchvision starts the class token at zero: a lost token would not show
            module.class_token.normal_()
        randomize_normalization(module)
        return module.eval()

    return Network("vit_small", "torch", build, (3, 32, 32))


def torchvision_vit(name: str, size: int = 32) -> Network:
    """``torchvision.models.<name>(image_size=size)`` with random weights, 10 classes, its class token
    randomised (torchvision starts it at zero: a lost token would not show)."""

    def build():
        torchvision = import_torchvision()
        torch.manual_seed(0)
        module = getattr(torchvision.models, name)(weights=None, num_classes=10, image_size=size)
        with torch.no_grad():
            module.class_token.normal_()
        randomize_normalization(module)
        return module.eval()

    return Network(name, "torch", build, (3, size, size))


def keras_transformer_block() -> keras.Model:
    """A conv stem with a batch norm, patches as a sequence, then a pre-norm transformer block."""
    keras.utils.set_random_seed(0)
    x = keras.Input((16, 16, 3))
    y = L.Conv2D(16, 4, strides=4, use_bias=False)(x)
    y = L.BatchNormalization(momentum=0.9)(y)
    y = L.ReLU()(y)
    y = L.Reshape((16, 16))(y)
    h = L.LayerNormalization(epsilon=1e-6)(y)
    h = L.MultiHeadAttention(4, 4, dropout=0.1)(h, h)
    y = L.Add()([y, h])
    h = L.LayerNormalization(epsilon=1e-6)(y)
    h = L.Dense(32, activation="gelu")(h)
    h = L.Dropout(0.1)(h)
    h = L.Dense(16)(h)
    y = L.Add()([y, h])
    y = L.GlobalAveragePooling1D()(y)
    model = keras.Model(x, L.Dense(10)(y), name="transformer_block")
    randomize_normalization(model)
    return model


TRANSFORMER_BLOCK = Network("transformer_block", "keras", keras_transformer_block, (16, 16, 3))

# ---- frozen batch norms and channels_first ------------------------------------------------------


def torchvision_frozen_resnet50(size: int = 96) -> Network:
    """A detection backbone: torchvision ``resnet50`` built with ``norm_layer=FrozenBatchNorm2d`` (its
    statistics, weight and bias randomised as a batch norm's), 10 classes, a ``size``×``size`` input."""

    def build():
        torchvision = import_torchvision()
        torch.manual_seed(0)
        module = torchvision.models.resnet50(
            weights=None, num_classes=10, norm_layer=torchvision.ops.misc.FrozenBatchNorm2d
        )
        randomize_normalization(module)
        return module.eval()

    return Network("resnet50_frozen_bn", "torch", build, (3, size, size))


def keras_channels_first_cnn(size: int = 32) -> Network:
    """A Keras CNN in ``channels_first``: three Conv2D + BatchNormalization(axis=1) + ReLU blocks, two
    MaxPooling2D, GlobalAveragePooling2D, Dense; input ``(3, size, size)``, as its conversion takes."""

    def build():
        keras.utils.set_random_seed(0)
        cf = {"data_format": "channels_first"}
        inputs = keras.Input((3, size, size))
        x = inputs
        for i, filters in enumerate((16, 32, 64)):
            if i:
                x = L.MaxPooling2D(2, name=f"pool{i}", **cf)(x)
            x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}", **cf)(x)
            x = L.BatchNormalization(axis=1, name=f"bn{i}")(x)
            x = L.ReLU(name=f"relu{i}")(x)
        x = L.GlobalAveragePooling2D(name="gap", **cf)(x)
        model = keras.Model(inputs, L.Dense(10, name="head")(x), name="channels_first_cnn")
        randomize_normalization(model)
        return model

    return Network("keras_channels_first_cnn", "keras", build, (3, size, size))


# Every network above. Extension point: add a network here; benchmarks/convert_cpu.py times it.
BEYOND: dict[str, Network] = {
    net.name: net
    for net in [
        *VIDEO_NETWORKS.values(),
        S3D,
        *SEGMENTATION_NETWORKS.values(),
        *SEQUENCE_NETWORKS,
        torchvision_frozen_resnet50(),
        small_vision_transformer(),
        torchvision_vit("vit_b_16"),
        TRANSFORMER_BLOCK,
        keras_channels_first_cnn(),
        # refused, naming the attention block and what stops it (EXPECTED_REFUSALS)
        torchvision_model("swin_t", size=32),
        torchvision_model("maxvit_t", size=224),  # its blocks' window partition needs 224x224
    ]
}
BENCHMARK_ONLY = frozenset({"s3d"})  # its smallest clip, (3, 13, 209, 209), takes ~40 s on two cores
EXPECTED_REFUSALS = frozenset({"swin_t", "maxvit_t"})
