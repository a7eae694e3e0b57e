"""SavedModel folders written by tf.keras / tf-keras 2 (``model.save("dir")``, TF 2.5-2.15's default), read as data.

Such a folder holds ``saved_model.pb`` (TensorFlow graphs: functions, which bnkit neither runs nor
reads), ``keras_metadata.pb`` (a small protobuf message: the Keras config of the model and of each of
its layers, as JSON) and ``variables/`` (a TensorFlow checkpoint: the variables' values and the
object graph that says which object holds each). bnkit

1. parses ``keras_metadata.pb`` with tf-keras' own message class (its size charged to the budget
   first), and the root node's JSON, the model config, with the bounded JSON parse;
2. translates the config as for a Keras 2 ``.h5`` (:mod:`bnkit.formats.keras2_config`), charges the
   variables Keras will create (:mod:`bnkit.formats.keras_variables`) and builds the model with Keras 3
   in safe mode (:func:`~bnkit.formats._keras_loading.build_keras2_model`);
3. reads the checkpoint with TensorFlow's checkpoint reader (``tf.train.load_checkpoint``: a table of
   tensors, read as data), each variable's bytes charged before it is read (and given back once its
   values are in the model: the budget bounds the model plus one variable read), and sets the weights layer
   by layer: a layer of the saved model is matched by name (through nested models) with the layer of
   the same name in the rebuilt one, its variables in Keras' legacy order (trainable, then
   non-trainable: as in an ``.h5``) with that layer's weights, shape by shape. Every weight of the
   model is set exactly once, and a saved layer with variables and no counterpart is refused.

A checkpoint key is the first path TensorFlow found to a variable (a nested model's first kernel is
``variables/0/...``, not the path through its layer), so keys are not derived from layer names: a
layer's node is found by its path in ``keras_metadata.pb`` (``root.layer_with_weights-0``), followed
through the checkpoint's object graph (``_CHECKPOINTABLE_OBJECT_GRAPH``), and its variables are its
``variables`` child's, in order (a layer with no such child, tf-keras' preprocessing layers such as
``Normalization``: its children named as its weights are).

A SavedModel with no ``keras_metadata.pb`` (``tf.saved_model.save``, Keras 3's ``model.export``) holds
no Keras model: it is refused, saying what to do instead. So is one tf.keras wrote before TF 2.5, which
kept the Keras config inside ``saved_model.pb`` (not read). TensorFlow (the ``tensorflow`` extra) is
imported only here; what its C++ code logs at import is kept as its warnings, off the error line.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.limits import JSON_EXPANSION, TENSOR_OVERHEAD, Budget, LimitExceeded, format_bytes, parse_json
from bnkit.streams import fd_output_logged
from bnkit.text import one_line, printable

__all__ = ["read", "write"]

METADATA = "keras_metadata.pb"
GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
MODELS = ("_tf_keras_network", "_tf_keras_sequential", "_tf_keras_model")  # keras_metadata identifiers
_LAYER = re.compile(r"layer-(\d+)")  # a model's i-th layer, in the object graph
_NEEDED_FOR = "reading a SavedModel folder"


def read(folder: Path, budget: Budget):
    """The Keras 3 model of the tf-keras 2 SavedModel ``folder`` (see the module doc)."""
    from bnkit.formats.keras2_config import Keras2ConfigError

    shown = printable(str(folder))
    if not (folder / METADATA).is_file():
        raise ModelFileError(
            f"{shown}: a TensorFlow SavedModel with no Keras model in it (no {METADATA}: tf.saved_model.save, "
            "Keras 3's model.export, or tf.keras before TF 2.5, which kept its config elsewhere): it holds a graph "
            "and variables but no layers bnkit can rebuild; save the model as .keras or .h5 instead (from its "
            "source code, or with TensorFlow 2.x: tf.keras.models.load_model(folder).save('model.h5'))"
        )
    tf, metadata_class = _import_tensorflow(shown)
    try:
        return _Reader(folder, shown, budget, tf, metadata_class).read()
    except Keras2ConfigError as e:
        raise ModelFileError(f"{shown}: {e}") from e
    except ValueError as e:  # parse_json: not JSON (LimitExceeded, also a ValueError, goes on to the caller)
        if type(e) is not ValueError:
            raise
        raise ModelFileError(f"{shown}: {e}") from e


def write(model, path: Path, *, force: bool = False, input_shape=None):
    """Write a Keras model as a tf-keras 2 SavedModel folder (:func:`bnkit.formats.saved_model_write.write`:
    tf-keras 2 saves it in a subprocess; read back here before it is renamed into place)."""
    from bnkit.formats.saved_model_write import write as write_folder

    return write_folder(model, path, force=force, input_shape=input_shape)


def _import_tensorflow(shown: str):
    """TensorFlow and tf-keras' ``SavedMetadata`` class; what TensorFlow's C++ code prints as it is
    imported goes to its logger (kept by the caller), not to the terminal."""
    from bnkit.frameworks import MissingFramework, import_optional

    with fd_output_logged("tensorflow"):
        try:
            tf = import_optional("tensorflow", _NEEDED_FOR)
            import_optional("tf_keras", _NEEDED_FOR)
        except MissingFramework as e:
            raise ModelFileError(f"{shown}: {e}") from e
        from tf_keras.protobuf.saved_metadata_pb2 import SavedMetadata

    return tf, SavedMetadata


class _Reader:
    """One SavedModel folder being read: its metadata, its checkpoint, the model built from its config."""

    def __init__(self, folder: Path, shown: str, budget: Budget, tf, metadata_class) -> None:
        self.folder, self.shown, self.budget, self.tf = folder, shown, budget, tf
        self.metadata_class = metadata_class
        self.assigned: dict[int, str] = {}  # id(variable) -> the checkpoint key it was set from

    def read(self):
        from bnkit.formats._keras_loading import build_keras2_model
        from bnkit.formats.keras2_config import translate
        from bnkit.formats.keras_variables import charge_variables, check_weights_cover

        nodes = self._metadata()
        original = self._model_config(nodes)
        config = translate(copy.deepcopy(original))
        renamed = _renamed(original, config)
        declared = charge_variables(config, self.budget, self.shown, legacy=True)
        checkpoint = _Checkpoint(self.folder, self.shown, self.budget, self.tf)
        check_weights_cover(declared, checkpoint.numeric_bytes, self.shown)
        graph = checkpoint.object_graph()
        self.graph = graph
        self.layers = self._layer_nodes(nodes, graph)
        model = build_keras2_model(self.shown, config)
        self._set_model(model, 0, (), renamed, checkpoint)
        for weight in model.weights:
            if id(weight) not in self.assigned:
                raise ModelFileError(
                    f"{self.shown}: the SavedModel holds no value for the model's weight {weight.path!r} "
                    "(no layer of that name with variables in its checkpoint)"
                )
        return model

    # ------------------------------------------------------------------------------ keras_metadata.pb

    def _metadata(self) -> dict[str, object]:
        """``keras_metadata.pb``'s nodes by path, parsed with tf-keras' message class, charged first."""
        from google.protobuf.message import DecodeError

        path = self.folder / METADATA
        size = path.stat().st_size
        self.budget.charge(2 * size, f"{METADATA} ({format_bytes(size)}: the file and its parsed message)")
        with open(path, "rb") as f:
            data = f.read(size + 1)
        if len(data) != size:
            raise ModelFileError(f"{self.shown}: {METADATA} changed while it was read")
        message = self.metadata_class()
        try:
            message.ParseFromString(data)
        except DecodeError as e:
            raise ModelFileError(f"{self.shown}: {METADATA} is not tf-keras' metadata message ({one_line(e)})") from e
        nodes: dict[str, object] = {}
        for node in message.nodes:
            if node.node_path in nodes:
                raise ModelFileError(f"{self.shown}: {METADATA} lists the object {node.node_path!r} twice")
            nodes[node.node_path] = node
        return nodes

    def _model_config(self, nodes: dict) -> dict:
        root = nodes.get("root")
        if root is None or root.identifier not in MODELS:
            what = "no root object" if root is None else f"a root object of kind {root.identifier!r}"
            raise ModelFileError(f"{self.shown}: {METADATA} describes {what}, not a Keras model")
        metadata = parse_json(root.metadata, f"{METADATA}'s model config", self.budget)
        if not isinstance(metadata, dict) or not isinstance(metadata.get("class_name"), str):
            raise ModelFileError(f"{self.shown}: {METADATA}'s model entry is not a JSON object with a class_name")
        if not isinstance(metadata.get("config"), dict) or not isinstance(metadata["config"].get("layers"), list):
            raise ModelFileError(
                f"{self.shown}: the model (class {metadata['class_name']!r}) was saved without a config of its "
                "layers (a subclassed tf.keras Model?): bnkit rebuilds a model only from its config; save it "
                "as a Functional or Sequential model, or as .h5 with its code at hand"
            )
        return {"class_name": metadata["class_name"], "config": metadata["config"]}

    def _layer_nodes(self, nodes: dict, graph) -> dict[int, tuple[str, str, str]]:
        """Object-graph node id -> (metadata path, identifier, layer name) of every Keras layer and model."""
        found: dict[int, tuple[str, str, str]] = {}
        for path, node in nodes.items():
            if not node.identifier.startswith("_tf_keras_") or node.identifier == "_tf_keras_metric":
                continue
            node_id = _resolve(graph, path)
            if node_id is None:
                continue  # a path the checkpoint does not hold: a layer without variables, or none of the model's
            metadata = parse_json(node.metadata, f"{METADATA}'s entry {path!r}", self.budget)
            self.budget.release(len(node.metadata) * JSON_EXPANSION)  # parsed for its name only, then dropped
            name = metadata.get("name") if isinstance(metadata, dict) else None
            if not isinstance(name, str):
                raise ModelFileError(f"{self.shown}: {METADATA}'s entry {path!r} has no layer name")
            found[node_id] = (path, node.identifier, name)
        return found

    # -------------------------------------------------------------------------------------- weights

    def _set_model(self, model, node_id: int, where: tuple, renamed: dict, checkpoint) -> None:
        """Set the weights of ``model``'s layers from those of the saved model at ``node_id``."""
        from keras.src.models.functional import Functional

        from bnkit.keras import keras

        names = renamed.get(where, {})
        layers = {layer.name: layer for layer in model.layers}
        model_path = self.layers[node_id][0] if node_id in self.layers else "root"
        children = _children(self.graph, node_id)
        order = sorted((int(m[1]), local, child) for local, child in children.items() if (m := _LAYER.fullmatch(local)))
        for _, local, child in order:
            keys = self._variable_keys(child, f"{model_path}.{local}")
            count = len(keys) if keys is not None else len(set(self._named_variables(child).values()))
            saved = self.layers.get(child)
            if saved is None:
                if count:
                    raise ModelFileError(
                        f"{self.shown}: the checkpoint's layer {model_path}.{local} holds {count} variables "
                        f"and has no entry in {METADATA}"
                    )
                continue
            _, identifier, saved_name = saved
            layer = layers.get(names.get(saved_name, saved_name))
            if layer is None:
                if count:
                    raise ModelFileError(
                        f"{self.shown}: the saved layer {saved_name!r} holds {count} variables, and the model "
                        "rebuilt from the config has no layer of that name"
                    )
                continue
            if any(id(weight) in self.assigned for weight in layer.weights):
                continue  # a layer shared by two models: set once
            nested = isinstance(layer, (Functional, keras.Sequential))
            if (identifier in MODELS) != nested:
                raise ModelFileError(
                    f"{self.shown}: layer {layer.name!r} is a {type(layer).__name__} rebuilt from the config, and "
                    f"{'a' if identifier in MODELS else 'not a'} model in the SavedModel ({identifier})"
                )
            if nested:
                self._set_model(layer, child, (*where, layer.name), renamed, checkpoint)
            else:
                self._set_layer(layer, keys if keys is not None else self._by_name(layer, child), checkpoint)

    def _set_layer(self, layer, keys: list[str], checkpoint) -> None:
        weights = _legacy_order(layer)
        what = f"layer {layer.name!r} ({type(layer).__name__})"
        if len(weights) != len(keys):
            raise ModelFileError(
                f"{self.shown}: {what} has {len(weights)} weights rebuilt from the config, and {len(keys)} "
                "variables in the checkpoint"
            )
        for weight, key in zip(weights, keys, strict=True):
            if id(weight) in self.assigned:
                raise ModelFileError(
                    f"{self.shown}: {what}: weight {weight.path!r} would be set twice, from "
                    f"{self.assigned[id(weight)]!r} and {key!r}"
                )
            expected = tuple(int(d) for d in weight.shape)
            if checkpoint.shape(key) is None:
                raise ModelFileError(
                    f"{self.shown}: {what}: the object graph names the variable {key!r}, which the "
                    "checkpoint does not hold"
                )
            if checkpoint.shape(key) != expected:
                raise ModelFileError(
                    f"{self.shown}: {what}: variable {key!r} has shape {checkpoint.shape(key)}, and the weight "
                    f"{weight.path!r} of the model rebuilt from the config has shape {expected}"
                )
            value, charged = checkpoint.value(key, f"{what}, weight {weight.path!r}")
            weight.assign(value)
            del value
            checkpoint.budget.release(charged)  # the values are in the model's variable now (charged before)
            self.assigned[id(weight)] = key

    def _by_name(self, layer, node_id: int) -> list[str]:
        """The checkpoint keys of ``layer``'s weights, by their names, for a layer whose node lists no
        ``variables`` (tf-keras' preprocessing layers: Normalization's mean, variance and count)."""
        named = self._named_variables(node_id)
        weights = _legacy_order(layer)
        what = f"layer {layer.name!r} ({type(layer).__name__})"
        missing = [weight.name for weight in weights if weight.name not in named]
        if missing or len(set(named.values())) != len(weights):
            raise ModelFileError(
                f"{self.shown}: {what} has the weights {[w.name for w in weights]} rebuilt from the config, and the "
                f"variables {sorted(named)} in the checkpoint"
            )
        return [named[weight.name] for weight in weights]

    def _named_variables(self, node_id: int) -> dict[str, str]:
        """The node's children that are variables: their names -> their checkpoint keys."""
        named = {}
        for local, child in _children(self.graph, node_id).items():
            attribute = next((a for a in self.graph.nodes[child].attributes if a.name == "VARIABLE_VALUE"), None)
            if attribute is not None:
                named[local] = attribute.checkpoint_key
        return named

    def _variable_keys(self, node_id: int, path: str) -> list[str] | None:
        """The checkpoint keys of the variables of the layer at ``node_id``, in its ``variables`` list's
        order (as its ``weights`` were in tf-keras: trainable first); None where it has no such list."""
        listing = _children(self.graph, node_id).get("variables")
        if listing is None:
            return None
        items = sorted(
            (int(local), child) for local, child in _children(self.graph, listing).items() if local.isdigit()
        )
        keys = []
        for _, child in items:
            attribute = next((a for a in self.graph.nodes[child].attributes if a.name == "VARIABLE_VALUE"), None)
            if attribute is None:
                raise ModelFileError(
                    f"{self.shown}: the checkpoint's object graph lists, as a variable of the layer at {path}, "
                    "an object with no value"
                )
            keys.append(attribute.checkpoint_key)
        return keys


class _Checkpoint:
    """``variables/variables`` read with TensorFlow's checkpoint reader, as data, bounded by the budget."""

    def __init__(self, folder: Path, shown: str, budget: Budget, tf) -> None:
        self.shown, self.budget, self.tf = shown, budget, tf
        variables = folder / "variables"
        index = variables / "variables.index"
        if not index.is_file():
            raise ModelFileError(
                f"{shown}: variables/variables.index is missing: the SavedModel's weights are not there"
            )
        data_files = sorted(variables.glob("variables.data-*-of-*"))
        if not data_files:
            raise ModelFileError(f"{shown}: variables/ holds no variables.data-* file: the weights are not there")
        size = index.stat().st_size
        budget.charge(
            size * JSON_EXPANSION, f"variables/variables.index ({format_bytes(size)}: the table of variables)"
        )
        self.data_bytes = sum(f.stat().st_size for f in data_files)
        self.reader = self._call("variables/variables.index", tf.train.load_checkpoint, str(variables / "variables"))
        self.shapes = self._call("variables/variables.index", self.reader.get_variable_to_shape_map)
        self.dtypes = self._call("variables/variables.index", self.reader.get_variable_to_dtype_map)
        self.numeric_bytes = 0
        for key, dtype in self.dtypes.items():
            if key in self.shapes and dtype.is_numpy_compatible and dtype != tf.string:
                nbytes = dtype.size
                for d in self.shapes[key]:
                    nbytes *= d
                self.numeric_bytes += nbytes
        if self.numeric_bytes > self.data_bytes:
            raise ModelFileError(
                f"{shown}: the checkpoint's variables declare {format_bytes(self.numeric_bytes)} of values, and "
                f"its data files hold {format_bytes(self.data_bytes)} (truncated?)"
            )

    def _call(self, what: str, function, *args):
        """TensorFlow's reader at work, its errors one line naming ``what``, its logs kept."""
        with fd_output_logged("tensorflow"):
            try:
                return function(*args)
            except LimitExceeded:
                raise
            except Exception as e:  # tf.errors.OpError (DataLossError, NotFoundError...), IndexError
                cause = one_line(str(e).split("\n\t")[0], 300)
                raise ModelFileError(
                    f"{self.shown}: {what}: TensorFlow's checkpoint reader failed ({type(e).__name__}: {cause})"
                ) from e

    def shape(self, key: str) -> tuple[int, ...] | None:
        shape = self.shapes.get(key)
        return None if shape is None else tuple(int(d) for d in shape)

    def object_graph(self):
        """The checkpoint's object graph, charged (at most what its data files hold besides the variables)."""
        from tensorflow.core.protobuf.trackable_object_graph_pb2 import TrackableObjectGraph

        if GRAPH_KEY not in self.shapes:
            raise ModelFileError(
                f"{self.shown}: the checkpoint holds no object graph ({GRAPH_KEY}): not one tf-keras 2 wrote"
            )
        bound = self.data_bytes - self.numeric_bytes
        self.budget.charge(
            2 * bound + TENSOR_OVERHEAD, f"the checkpoint's object graph (at most {format_bytes(bound)}, and parsed)"
        )
        data = self._call(f"variables/: the object graph ({GRAPH_KEY})", self.reader.get_tensor, GRAPH_KEY)
        graph = TrackableObjectGraph()
        try:
            graph.ParseFromString(bytes(data))
        except Exception as e:  # DecodeError, or not bytes at all
            raise ModelFileError(f"{self.shown}: the checkpoint's {GRAPH_KEY} is not an object graph ({e})") from e
        if not graph.nodes:
            raise ModelFileError(f"{self.shown}: the checkpoint's object graph is empty")
        count = len(graph.nodes)
        for node in graph.nodes:
            for child in node.children:
                if not 0 <= child.node_id < count:
                    raise ModelFileError(f"{self.shown}: the checkpoint's object graph refers to a node it lacks")
        return graph

    def value(self, key: str, what: str):
        """The value of variable ``key`` (a NumPy array) and the bytes charged for it before it was read,
        for the caller to release once the value is in the model."""
        shape, dtype = self.shape(key), self.dtypes.get(key)
        if shape is None or dtype is None:
            raise ModelFileError(f"{self.shown}: {what}: the checkpoint has no variable {key!r}")
        if dtype == self.tf.string or not dtype.is_numpy_compatible or not (dtype.is_floating or dtype.is_integer):
            raise ModelFileError(f"{self.shown}: {what}: variable {key!r} holds {dtype.name}, not numbers")
        charged = self.budget.charge_tensor(list(shape), dtype.size, f"variable {key!r} ({what})") + TENSOR_OVERHEAD
        value = self._call(f"variables/: variable {key!r}", self.reader.get_tensor, key)
        if tuple(getattr(value, "shape", ())) != shape:
            raise ModelFileError(f"{self.shown}: {what}: variable {key!r} read with shape {value.shape}, not {shape}")
        return value, charged


def _legacy_order(layer) -> list:
    """A Keras 3 layer's weights in Keras' legacy order (trainable, then non-trainable), tf-keras' order."""
    return layer.trainable_weights + layer.non_trainable_weights


def _children(graph, node_id: int) -> dict[str, int]:
    return {child.local_name: child.node_id for child in graph.nodes[node_id].children}


def _resolve(graph, path: str) -> int | None:
    """The object-graph node at ``path`` (``root.layer_with_weights-0.layer-1``), or None."""
    parts = path.split(".")
    if parts[0] != "root":
        return None
    node = 0
    for part in parts[1:]:
        node = _children(graph, node).get(part)
        if node is None:
            return None
    return node


def _renamed(original: dict, translated: dict, where: tuple = ()) -> dict[tuple, dict[str, str]]:
    """Each model's Keras 2 layer names -> the names translation gave them (``conv1/bn`` -> ``conv1_bn``),
    by the path of translated names of the model (``()`` for the outer one)."""
    result: dict[tuple, dict[str, str]] = {}
    old_layers = (original.get("config") or {}).get("layers") if isinstance(original, dict) else None
    new_layers = (translated.get("config") or {}).get("layers") if isinstance(translated, dict) else None
    if not isinstance(old_layers, list) or not isinstance(new_layers, list) or len(old_layers) != len(new_layers):
        return result
    names = {}
    for old, new in zip(old_layers, new_layers, strict=True):
        old_name, new_name = _layer_name(old), _layer_name(new)
        if isinstance(old_name, str) and isinstance(new_name, str):
            names[old_name] = new_name
            result.update(_renamed(old, new, (*where, new_name)))
    result[where] = names
    return result


def _layer_name(layer) -> str | None:
    if not isinstance(layer, dict):
        return None
    inner = layer.get("config")
    return layer.get("name", inner.get("name") if isinstance(inner, dict) else None)
