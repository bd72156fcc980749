"""The classifier: a TF Hub feature-vector backbone (frozen) and a new dropout + dense head.

Everything here uses tf-keras (Keras 2): ``hub.KerasLayer`` does not mix with Keras 3 models.
The exported serving model (``export_serving_model``) is a plain TensorFlow SavedModel whose
signature takes encoded image bytes (base64 strings) and returns class names and probabilities,
so whoever pulls it needs no preprocessing code and loading it runs nothing but TensorFlow's graph.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

from petalflow.tasks.common import (
    credentials_advice, imports_settled, log, not_a_saved_model, redact_url, redact_urls_in,
    refused_for_now, tls_problem, url_authorization,
)
from petalflow.tasks.serving import ERROR_UNDECODABLE, PROB_PREFIX, output_columns  # noqa: F401


def keras():
    """tf-keras (Keras 2): the Keras that ``hub.KerasLayer`` works with."""
    imports_settled("tensorflow_hub")  # which imports tf-keras (``common.imports_settled``)
    import tf_keras

    return tf_keras


BACKBONE_FETCH_TIMEOUT_S = 60  # per socket operation; TF Hub's own download has none


def fetch_backbone(handle: str, cache_dir: Path) -> str:
    """The local SavedModel folder of a TF Hub handle, downloading it into ``cache_dir`` first
    when it is a URL (TF Hub's own resolver: atomic, locked, reused by every later run). A
    private server's credentials come from the URL or, kept out of it, the machine's netrc
    file (``common.url_authorization``), sent to that host only; messages name the URL
    without them (``redact_url``).

    Network trouble raises TransientError (the task retries it); a handle that does not exist
    or is not a SavedModel raises BackboneError (no retry).
    """
    import socket
    import urllib.error

    from petalflow.tasks.errors import BackboneError, TransientError, is_transient_status

    shown = redact_url(handle)
    if "://" not in handle:
        path = Path(handle).expanduser().resolve()
    else:
        try:
            bare, authorization = url_authorization(handle)
        except ValueError as exc:
            raise BackboneError(f"{exc} (backbone {shown})") from None
        imports_settled("tensorflow_hub")
        import tensorflow_hub as hub

        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        previous_cache = os.environ.get("TFHUB_CACHE_DIR")
        os.environ["TFHUB_CACHE_DIR"] = str(cache_dir)  # read by hub.resolve, restored below
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(BACKBONE_FETCH_TIMEOUT_S)
        try:
            path = Path(hub.resolve(bare) if authorization is None
                        else _authorized_resolver(authorization)(bare))
        except urllib.error.HTTPError as exc:
            if is_transient_status(exc.code):
                raise refused_for_now(exc.code, (exc.headers or {}).get("Retry-After"),
                                      f"fetching backbone {shown}") from exc
            raise BackboneError(
                f"HTTP {exc.code} fetching backbone {shown}; check --backbone"
                + credentials_advice(handle, exc.code, "the backbone")) from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as exc:
            refused = tls_problem(exc, bare)
            if refused:
                raise BackboneError(f"{refused} (backbone {shown})") from exc
            raise TransientError(f"network error fetching backbone {shown}: {exc}") from exc
        except Exception as exc:  # a download that is not a model archive, a bad tar...
            raise BackboneError(f"cannot fetch backbone {shown}: {redact_urls_in(str(exc))}") \
                from exc
        finally:
            socket.setdefaulttimeout(previous)
            if previous_cache is None:
                os.environ.pop("TFHUB_CACHE_DIR", None)
            else:
                os.environ["TFHUB_CACHE_DIR"] = previous_cache
    if not (path / "saved_model.pb").is_file():
        raise BackboneError(
            f"backbone {shown} is not a TF Hub SavedModel ({path}: {not_a_saved_model(path)})")
    return str(path)


def _authorized_resolver(authorization: str):
    """TF Hub's resolver of compressed models over HTTP(S) (what ``hub.resolve`` uses for a
    URL), sending ``authorization`` with its request: not with a redirect's, which may lead to
    another host (an object store's signed URL), as curl and httpx do."""
    import urllib.request

    from tensorflow_hub.compressed_module_resolver import HttpCompressedFileResolver

    class Authorized(HttpCompressedFileResolver):
        def _call_urlopen(self, request):
            if isinstance(request, str):
                request = urllib.request.Request(request)
            request.add_unredirected_header("Authorization", authorization)
            return super()._call_urlopen(request)

    return Authorized()


def serving_signature(saved_model_dir: Path):
    """The SavedModel's ``serving_default`` signature with one input, read from the graph's
    description only (no weights loaded); None when it has none. What ``check_image_size``
    and ``classification_warning`` read (one parse of ``saved_model.pb``, ~10 ms for
    MobileNetV2 0.35, serves both). The train flow's first import of TensorFlow: it waits for
    the command's side thread's (``common.imports_settled``)."""
    imports_settled("tensorflow")
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    for graph in proto.meta_graphs:
        signature = graph.signature_def.get("serving_default")
        if signature is not None and len(signature.inputs) == 1:
            return signature
    return None


def _dims(tensor_info) -> Optional[list]:
    shape = tensor_info.tensor_shape
    return None if shape.unknown_rank else [d.size for d in shape.dim]


def declared_input_size(saved_model_dir: Path):
    """The square input size a backbone's serving signature declares ([batch, S, S, 3]), or
    None when it declares none (dynamic sizes, or no serving signature)."""
    return _input_size(serving_signature(saved_model_dir))


def _input_size(signature) -> Optional[int]:
    dims = _dims(next(iter(signature.inputs.values()))) if signature is not None else None
    if dims is not None and len(dims) == 4 and dims[1] == dims[2] and dims[1] > 0:
        return int(dims[1])
    return None


# Output widths of ImageNet classification models: 1000 classes, or 1001 with "background"
# (TF Hub's and Kaggle's MobileNet, Inception, ResNet and EfficientNet classification handles).
IMAGENET_CLASS_SCORES = (1000, 1001)


def classification_warning(signature, handle: str) -> Optional[str]:
    """What to say when a backbone looks like an ImageNet classification model rather than an
    image feature vector (its ``serving_signature``'s one output is 1000 or 1001 wide), else
    None. Training on it works, on class scores: hence a warning, not a refusal."""
    if signature is None or len(signature.outputs) != 1:
        return None
    dims = _dims(next(iter(signature.outputs.values())))
    if not dims or len(dims) != 2 or dims[-1] not in IMAGENET_CLASS_SCORES:
        return None
    return (f"backbone {handle} outputs {dims[-1]} values per image, as ImageNet "
            "classification models do (one score per ImageNet class): the head would learn "
            "your classes from those scores instead of the image features before them. If this "
            "is a classification model, give the same network's feature-vector model (on TF "
            "Hub and Kaggle its handle says feature_vector where this one says classification)")


def check_image_size(signature, handle: str, image_size: int,
                     set_by: Optional[list[str]] = None) -> None:
    """Refuse an image size the backbone (its ``serving_signature``) does not take, naming
    both and where the size was set (BackboneError): --image-size, or ``set_by``, the sweep
    candidates that set it (``image_size_set_by``)."""
    from petalflow.tasks.errors import BackboneError

    declared = _input_size(signature)
    if declared is None or declared == image_size:
        return
    if not set_by:
        raise BackboneError(
            f"backbone {handle} takes {declared}x{declared} images but --image-size is "
            f"{image_size}; set --image-size {declared} (image_size in the run form)")
    raise BackboneError(
        f"backbone {handle} takes {declared}x{declared} images but {', '.join(set_by)} "
        f"set{'s' if len(set_by) == 1 else ''} image_size {image_size}; give "
        f"{'it' if len(set_by) == 1 else 'them'} image_size {declared} (the Sweep field in "
        "the run form), or none to use --image-size")


def load_backbone(handle: str, trainable: bool = False):
    """``hub.KerasLayer`` over a TF Hub handle (URL or local SavedModel folder).

    The layer maps float32 images [batch, size, size, 3] in [0, 1] to features [batch, dim].
    """
    imports_settled("tensorflow_hub")
    import tensorflow_hub as hub

    keras()
    # Given the loaded object, not the handle: with a handle, KerasLayer first tries Keras 3's
    # load context, which imports Keras 3 (~1 s and ~90 MB, then unused); hub.load is the load
    # it would make next, with the same options (the defaults outside a Keras load).
    return hub.KerasLayer(hub.load(handle), trainable=trainable, name="backbone")


def feature_dim(backbone, image_size: int) -> int:
    """Width of the backbone's feature vector: the output shape its SavedModel declares when
    it declares one (free), else found by running it once on a blank image. Running it costs
    the backbone's first call (~0.7 s for MobileNetV2 0.35), and on the CPU the training never
    calls the TensorFlow backbone otherwise (its features come from TFLite)."""
    import tensorflow as tf

    shape = _declared_output_shape(backbone)
    if shape is None:
        shape = backbone(tf.zeros([1, image_size, image_size, 3]), training=False).shape
    if len(shape) != 2:
        raise ValueError(
            f"backbone output has shape {shape}; an image *feature vector* model is needed "
            "(output [batch, features])"
        )
    return int(shape[-1])


def _declared_output_shape(backbone):
    """The output shape every traced call of a TF Hub layer's SavedModel declares, when they
    all agree on a known rank and a known last dimension; else None."""
    func = getattr(getattr(backbone, "_func", None), "__call__", None)  # hub.KerasLayer's model
    shapes = {tuple(cf.structured_outputs.shape.as_list())
              for cf in getattr(func, "concrete_functions", ())
              if hasattr(cf.structured_outputs, "shape")
              and cf.structured_outputs.shape.rank is not None}
    if len(shapes) != 1:
        return None
    (shape,) = shapes
    return shape if shape and shape[-1] is not None else None


def variables_only(layer):
    """A trackable holding only ``layer``'s variables, in its order, not the layer with its
    traced functions: what a training checkpoint saves of the backbone (a TF Hub layer's ~150
    restored functions made every save slow: MobileNetV2 0.35, 0.35-0.40 s per checkpoint with
    the layer, 0.11 s with its variables). Readers of a checkpoint restore
    ``backbone=variables_only(layer)``."""
    import tensorflow as tf

    holder = tf.Module()
    holder.weights_ = list(layer.variables)
    return holder


def build_head(dim: int, num_classes: int, dropout: float = 0.2, seed: int = 0):
    """Dropout + softmax Dense over the backbone's features: [batch, dim] -> [batch, classes]."""
    k = keras()
    return k.Sequential(
        [
            k.Input(shape=(dim,), name="features"),
            k.layers.Dropout(dropout, seed=seed),
            k.layers.Dense(
                num_classes,
                activation="softmax",
                dtype="float32",  # softmax in float32 even under a mixed-precision policy
                kernel_initializer=k.initializers.GlorotUniform(seed=seed),
                name="classes",
            ),
        ],
        name="head",
    )


def build_classifier(backbone, head, image_size: int):
    """Images [batch, size, size, 3] in [0, 1] -> class probabilities, BatchNorm in inference."""
    k = keras()
    inputs = k.Input(shape=(image_size, image_size, 3), name="image")
    # training=False keeps the backbone's BatchNorm statistics fixed, also while fine-tuning.
    features = backbone(inputs, training=False)
    return k.Model(inputs, head(features), name="classifier")


def unfreeze_top_layers(backbone, n: int) -> list[str]:
    """Make only the top ``n`` layers of a ``hub.KerasLayer(trainable=True)`` trainable.

    A Hub SavedModel exposes variables, not layers; its variables come in topological order and
    are named ``<layer path>/<weight>`` (``block_16_project/kernel`` from Keras exports,
    ``MobilenetV2/expanded_conv_16/project/weights`` from TF-Slim ones), so the last ``n``
    distinct layer paths are the top layers. Returns those layer paths (top last). Variables of
    lower layers are moved to the layer's non-trainable weights: the optimizer never sees them.
    """
    weights = list(backbone._trainable_weights)  # noqa: SLF001 - hub exposes no per-layer API
    layer_of = [w.name.rsplit("/", 1)[0] if "/" in w.name else w.name for w in weights]
    order: list[str] = []
    for name in layer_of:
        if name not in order:
            order.append(name)
    top = order[-n:] if n > 0 else []
    keep = [w for w, layer in zip(weights, layer_of) if layer in top]
    frozen = [w for w, layer in zip(weights, layer_of) if layer not in top]
    # Mutate the layer's own (untracked) lists in place: assigning new lists would make Keras
    # track them and re-file every variable by its `trainable` flag, undoing the split.
    backbone._trainable_weights[:] = keep  # noqa: SLF001
    backbone._non_trainable_weights[:0] = frozen  # noqa: SLF001
    return top


def _normalise_base64(image):
    import tensorflow as tf

    # Accept standard and URL-safe base64, with or without a data: URI prefix or line breaks.
    image = tf.strings.regex_replace(image, r"^data:[^,]*,", "")
    image = tf.strings.regex_replace(image, r"\s", "")
    image = tf.strings.regex_replace(image, r"\+", "-")
    return tf.strings.regex_replace(image, "/", "_")


def frozen_function(fn, image_size: int, spec=None):
    """``fn`` (images [n, size, size, 3] float32 -> tensors; or ``spec``'s input) traced once
    and frozen: weights as constants, nested functions inlined, pass-through operations
    removed. What the serving export and every TFLite conversion (``edge.tflite_converter``)
    build on.

    ``convert_variables_to_constants_v2``'s own steps, less its last one: it imports the frozen
    GraphDef as a function, which is then rebuilt without the ``Identity`` and ``NoOp``
    operations freezing leaves behind (the variable reads' chains: MobileNetV2 0.35 frozen is
    2,847 operations, 2,423 of them pass-through; without them 425), so the GraphDef is
    imported once, pruned (Grappler's dependency optimizer, the pass TensorFlow Lite's
    converter runs first). Measured on MobileNetV2 0.35: freezing 1.53 -> 0.95 s and its peak
    -50 MiB; the serving model (a SavedModel of the function alone) loads in 0.06 s instead of
    0.22 (18 MiB instead of 48) and its first call (16 images) takes 0.21 s instead of 0.41
    (151 MiB instead of 178). The outputs are the same to 6e-6."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        _FunctionConverterDataInEager,
        _replace_variables_by_constants,
    )

    spec = spec or tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
    traced = tf.function(fn, input_signature=[spec]).get_concrete_function()
    graph_def, converted = _replace_variables_by_constants(
        converter_data=_FunctionConverterDataInEager(func=traced, lower_control_flow=True,
                                                     aggressive_inlining=False))
    constants = {id(traced.graph.internal_captures[i]) for i in converted}
    inputs = [t for t in traced.inputs if id(t) not in constants]
    return _without_pass_through(graph_def, inputs, traced.outputs, traced.graph)


def _without_pass_through(graph_def, inputs, outputs, graph, inline: bool = False):
    """The function of frozen ``graph_def`` from ``inputs`` to ``outputs`` (tensors of
    ``graph``), its ``Identity`` and ``NoOp`` operations removed but for the outputs'; with
    ``inline``, the functions it calls inlined first (Grappler's function optimizer)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import rewriter_config_pb2
    from tensorflow.lite.python.util import run_graph_optimizations

    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.optimizers.extend(
        ["function", "dependency"] if inline else ["dependency"])
    config.graph_options.rewrite_options.meta_optimizer_iterations = (
        rewriter_config_pb2.RewriterConfig.ONE)
    return _imported_function(
        run_graph_optimizations(graph_def, inputs, outputs, config, graph=graph),
        [t.name for t in inputs], [t.name for t in outputs], [t.shape for t in inputs])


def _imported_function(graph_def, input_names, output_names, input_shapes):
    """The function of ``graph_def`` from the tensors ``input_names`` (of ``input_shapes``) to
    ``output_names``."""
    from tensorflow.python.eager.wrap_function import function_from_graph_def

    fn = function_from_graph_def(graph_def, list(input_names), list(output_names))
    for tensor, shape in zip(fn.inputs, input_shapes):
        tensor.set_shape(shape)  # importing a GraphDef loses the batch dimension's None
    return fn


def frozen_backbone(backbone, image_size: int):
    """images -> the backbone's features, frozen (``frozen_function``): what the TFLite
    feature engine converts and ``frozen_network`` builds on."""
    return frozen_function(lambda images: backbone(images, training=False), image_size)


def frozen_from_signature(saved_model_dir: Path, image_size: int):
    """images -> features frozen straight from the backbone SavedModel's serving signature:
    its graph and variables read as a TensorFlow 1 graph, only the functions that graph calls
    kept, the variables made constants (``frozen_backbone``'s result, without loading the
    backbone as a TF Hub layer). None when the SavedModel is not a plain feature-vector
    model this way (not one "serve" graph, no ``serving_default`` of one float32 image input
    [batch, S, S, 3] and one float32 [batch, features] output, an initialisation that is not a
    no-op) or cannot be read so: the caller loads it as a TF Hub layer instead.

    A TF Hub layer restores every function the SavedModel holds (MobileNetV2 0.35: 633, of
    which its serving signature calls 2) before it can be frozen. Measured on MobileNetV2
    0.35: 0.85 s instead of 2.7 s (load 1.6-2.3 s + freeze ~1 s); features within 2e-5 of
    the TF Hub layer's frozen function (BENCHMARKS.md, target 1)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_from_session_graph,
    )
    from tensorflow.python.util import deprecation

    folder = Path(saved_model_dir)
    try:
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((folder / "saved_model.pb").read_bytes())
        graph = _plain_serving_graph(proto, image_size)
        if graph is None:
            return None
        meta, image, features = graph
        _keep_called_functions(meta.graph_def)
        with tf.Graph().as_default() as loaded:
            saver = tf.compat.v1.train.import_meta_graph(meta, clear_devices=True)
            with tf.compat.v1.Session(graph=loaded) as session:
                if saver is not None:
                    saver.restore(session, str(folder / "variables" / "variables"))
                # (Quiet: the helper calls a deprecated one of TensorFlow's own, and the
                # warning would be the first training's only one in the user's log.)
                with deprecation.silence():
                    graph_def = convert_variables_to_constants_from_session_graph(
                        session, loaded.as_graph_def(), [features.split(":")[0]])
        with tf.Graph().as_default() as frozen:
            tf.graph_util.import_graph_def(graph_def, name="")
            inputs = [frozen.get_tensor_by_name(image)]
            outputs = [frozen.get_tensor_by_name(features)]
            inputs[0].set_shape([None, image_size, image_size, 3])
        return _without_pass_through(graph_def, inputs, outputs, frozen, inline=True)
    except Exception as exc:  # noqa: BLE001 - any reading failure: the TF Hub load decides
        log("backbone: not frozen from its serving signature (%s); loading it as a TF Hub "
            "layer", " ".join(str(exc).split())[:200] or type(exc).__name__, level=30)
        return None


def _plain_serving_graph(proto, image_size: int):
    """(meta graph, image input name, features output name) of a SavedModel whose one
    "serve" graph has a ``serving_default`` signature from one float32 [batch, S, S, 3] image
    (S = ``image_size`` or unknown) to one float32 [batch, features], and an initialisation
    that does nothing; else None."""
    from tensorflow.core.framework import types_pb2

    graphs = [g for g in proto.meta_graphs if "serve" in g.meta_info_def.tags]
    if len(graphs) != 1:
        return None
    meta = graphs[0]
    signature = meta.signature_def.get("serving_default")
    if signature is None or len(signature.inputs) != 1 or len(signature.outputs) != 1:
        return None
    (image,), (features,) = signature.inputs.values(), signature.outputs.values()
    in_dims = [d.size for d in image.tensor_shape.dim]
    out_dims = [d.size for d in features.tensor_shape.dim]
    if (image.dtype != types_pb2.DT_FLOAT or features.dtype != types_pb2.DT_FLOAT
            or image.tensor_shape.unknown_rank or len(in_dims) != 4 or in_dims[3] != 3
            or any(d not in (-1, image_size) for d in in_dims[1:3])
            or features.tensor_shape.unknown_rank or len(out_dims) != 2 or out_dims[1] <= 0):
        return None
    init = meta.signature_def.get("__saved_model_init_op")
    if init is not None:
        names = {t.name.split(":")[0] for t in init.outputs.values()}
        if any(n.name in names and n.op != "NoOp" for n in meta.graph_def.node):
            return None
    return meta, image.name, features.name


def _keep_called_functions(graph_def) -> None:
    """Drop from ``graph_def``'s function library every function its nodes never call (a TF
    Hub SavedModel keeps one per layer and call variant for its Python objects)."""
    library = {f.signature.name: f for f in graph_def.library.function}

    def called(nodes) -> set:
        names = set()
        for node in nodes:
            for value in node.attr.values():
                if value.HasField("func"):
                    names.add(value.func.name)
                names.update(f.name for f in value.list.func)
        return names

    pending, kept = called(graph_def.node), {}
    while pending:
        name = pending.pop()
        if name in library and name not in kept:
            kept[name] = library[name]
            pending |= called(library[name].node_def)
    del graph_def.library.function[:]
    graph_def.library.function.extend(kept.values())


FROZEN_GRAPH = "frozen.pb"  # save_frozen's files
FROZEN_SIGNATURE = "frozen.json"


def save_frozen(fn, folder: Path) -> None:
    """Write ``fn`` (a ``frozen_function``: a GraphDef with its weights as constants) into
    ``folder``: its graph and its inputs' and outputs' names and shapes. Written into a
    temporary folder renamed into place, so a reader finds all of it or nothing; a folder
    already there (another training wrote it) is kept."""
    import tempfile

    folder = Path(folder)
    if folder.exists():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        (tmp / FROZEN_GRAPH).write_bytes(fn.graph.as_graph_def().SerializeToString())
        (tmp / FROZEN_SIGNATURE).write_text(json.dumps({
            "inputs": [{"name": t.name, "shape": t.shape.as_list()} for t in fn.inputs],
            "outputs": [t.name for t in fn.outputs],
        }))
        os.rename(tmp, folder)
    except OSError:
        if not folder.exists():  # else another training renamed its copy into place first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_frozen(folder: Path):
    """The function ``save_frozen`` wrote into ``folder`` (the same graph: the same outputs, bit
    for bit); None when there is none, or when it cannot be read: then the folder is removed
    (it is whole or absent, so unreadable means damaged) for the caller to write it again."""
    import tensorflow as tf

    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        signature = json.loads((folder / FROZEN_SIGNATURE).read_text())
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString((folder / FROZEN_GRAPH).read_bytes())
        return _imported_function(graph_def, [i["name"] for i in signature["inputs"]],
                                  signature["outputs"],
                                  [i["shape"] for i in signature["inputs"]])
    except Exception as exc:  # noqa: BLE001 - unreadable: frozen again from the backbone
        log("the frozen backbone in %s cannot be read (%s); the backbone is loaded and frozen "
            "again", folder, " ".join(str(exc).split())[:200], level=30)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def frozen_network(backbone, head, image_size: int, features_fn=None):
    """images [n, size, size, 3] -> (backbone features, class probabilities), without
    variables: exported for serving and converted to the edge models.

    The backbone and the head are frozen apart and called in turn: ``features_fn`` is the
    backbone's frozen function when the training has it already (``frozen_backbone``, made for
    the TFLite feature engine and still valid when the backbone was not fine-tuned), else it is
    frozen here. Freezing MobileNetV2 0.35 takes ~1 s (``frozen_function``), the head
    ~0.05 s; measured against freezing both at once: the same outputs, served
    predictions and TFLite models' outputs bit for bit (225 photos), the same SavedModel load
    and first-call time.

    A TF Hub backbone is a SavedModel of ~150 functions (one per layer); exported as they are,
    loading the serving model deserialises each one. Frozen, the exported graph has ~20
    functions: measured on MobileNetV2 0.35, load 3.0 -> 0.6 s, first call 1.5 -> 1.0 s, export
    5.0 -> 3.1 s; outputs within 2e-6 (probabilities) and 2e-5 (features)."""
    import tensorflow as tf

    features_fn = features_fn or frozen_backbone(backbone, image_size)
    features_out = features_fn.outputs[0]
    head_fn = frozen_function(
        lambda features: head(features, training=False), image_size,
        spec=tf.TensorSpec([None, int(features_out.shape[-1])], features_out.dtype,
                           name="features"))

    def network(images):
        features = features_fn(images)[0]
        return features, head_fn(features)[0]

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
    return tf.function(network, input_signature=[spec]).get_concrete_function()


def _serving_module(network, class_names: Sequence[str], image_size: int):
    """The tf.Module exported for serving over ``network`` (``frozen_network``); defined here
    so TF is imported lazily."""
    import tensorflow as tf

    from petalflow.tasks.images import (
        decode_image, exif_orientations, exif_window, upright_images,
    )

    num_classes = len(class_names)
    feature_width = int(network.outputs[0].shape[-1])
    # EXIF orientation: traced once for the three signatures that call it (inlined into each,
    # the export took ~0.15 s longer).
    orientations = tf.function(exif_orientations, autograph=False,
                               input_signature=[tf.TensorSpec([None], tf.string)])
    turn = tf.function(upright_images, autograph=False, input_signature=[
        tf.TensorSpec([None, image_size, image_size, 3], tf.float32),
        tf.TensorSpec([None], tf.int32)])
    # The decoding too (its branches for large images are a dozen functions): traced once,
    # one copy in the SavedModel, instead of once in each signature.
    decode = tf.function(functools.partial(decode_image, image_size=image_size),
                         autograph=False, input_signature=[tf.TensorSpec([], tf.string)])

    # Its signatures are traced without AutoGraph (autograph=False): their Python `if`s and
    # loops are on Python values (is_base64, with_features, the class names), the rest
    # TensorFlow ops; converting them cost ~0.4 s of every export.
    class PetalflowClassifier(tf.Module):
        def __init__(self):
            super().__init__(name="petalflow_classifier")
            self.class_names = tf.Variable(list(class_names), trainable=False, dtype=tf.string)

        def _decode(self, raw_bytes_or_b64, is_base64: bool):
            """(row numbers of the decodable rows, their images, number of rows)."""
            n = tf.shape(raw_bytes_or_b64, out_type=tf.int64)[0]

            def load(i, item):
                data = tf.io.decode_base64(_normalise_base64(item)) if is_base64 else item
                return i, decode(data), exif_window(data)

            ds = tf.data.Dataset.zip(
                (tf.data.Dataset.range(n), tf.data.Dataset.from_tensor_slices(raw_bytes_or_b64))
            )
            # A bad row is skipped here and reported through `error`, never failing the batch.
            ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
            # Decode everything first and run the network once, outside any loop: inside a
            # loop body TensorFlow skips the CPU graph optimisations (about 5x slower). The
            # decodable rows come out as one batch (no row decodable: the empty batch after
            # it); reducing over batches instead cost ~15 ms per call, half of a one-image
            # request (BENCHMARKS.md, serving latency).
            empty = tf.data.Dataset.from_tensors(
                (tf.zeros([0], tf.int64), tf.zeros([0, image_size, image_size, 3]),
                 tf.zeros([0], tf.string)))
            idx, images, windows = ds.batch(tf.maximum(n, 1)).concatenate(empty).take(1) \
                .get_single_element()
            # Turned upright as their EXIF says, as in training: the whole batch at once.
            images = turn(images, orientations(windows))
            return tf.reshape(idx, [-1, 1]), images, n

        def _on_decodable(self, raw_bytes_or_b64, is_base64: bool, network, width: int):
            """(ok [n], ``network``'s float32 outputs [n, width]): the network runs once on
            the decodable rows; undecodable rows get ok false and zeros."""
            idx_all, images, n = self._decode(raw_bytes_or_b64, is_base64)
            values = tf.cond(  # an all-bad batch must not reach the network (empty input)
                tf.shape(images)[0] > 0,
                lambda: tf.cast(network(images), tf.float32),
                lambda: tf.zeros([0, width], tf.float32),
            )
            ok = tf.scatter_nd(idx_all, tf.ones([tf.shape(idx_all)[0]], tf.bool), [n])
            return ok, tf.scatter_nd(idx_all, values, tf.stack([n, width]))

        def _classify(self, raw_bytes_or_b64, is_base64: bool, with_features: bool = False):
            if with_features:  # one network call: [probabilities | features] per row
                def both(x):
                    features, probs = network(x)
                    return tf.concat([tf.cast(probs, tf.float32), tf.cast(features, tf.float32)],
                                     axis=1)

                ok, both_full = self._on_decodable(raw_bytes_or_b64, is_base64, both,
                                                   num_classes + feature_width)
                probs_full = both_full[:, :num_classes]
            else:
                ok, probs_full = self._on_decodable(raw_bytes_or_b64, is_base64,
                                                    lambda x: network(x)[1], num_classes)
            best = tf.argmax(probs_full, axis=1)
            names = tf.convert_to_tensor(self.class_names)
            out = {
                "label": tf.where(ok, tf.gather(names, best), ""),
                "probability": tf.where(ok, tf.reduce_max(probs_full, axis=1), 0.0),
                "error": tf.where(ok, "", ERROR_UNDECODABLE),
            }
            for c, name in enumerate(class_names):
                out[PROB_PREFIX + name] = probs_full[:, c]
            if with_features:
                out["features"] = both_full[:, num_classes:]
            return out

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
                     autograph=False)
        def embed_bytes(self, image_bytes):
            """Raw encoded image bytes -> the backbone's features ([n, dim], zeros where
            ``ok`` is false: undecodable rows); what drift is measured on."""
            ok, features = self._on_decodable(image_bytes, False, lambda x: network(x)[0],
                                              feature_width)
            return {"features": features, "ok": ok}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image")],
                     autograph=False)
        def serve(self, image):
            """image: base64-encoded image files -> label, probability, error, prob_<class>."""
            return self._classify(image, True)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
                     autograph=False)
        def classify_bytes(self, image_bytes):
            """The same on raw (not base64) encoded image bytes, plus ``features``: the
            backbone's features of each row from the same pass (zeros for undecodable rows),
            so a prediction job measures drift without running the backbone again."""
            return self._classify(image_bytes, False, with_features=True)

    return PetalflowClassifier()


def export_serving_model(
    network, class_names: Sequence[str], image_size: int, path: Path, metadata: dict
) -> Path:
    """Save the self-contained serving SavedModel of ``network`` (``frozen_network`` of the
    trained backbone and head) to ``path`` (plus ``petalflow.json`` metadata).

    Signatures: ``serving_default`` (input ``image``: base64 strings) and ``classify_bytes``
    (input ``image_bytes``: raw bytes). Outputs per row: ``label`` (class name, "" on error),
    ``probability`` (of that label), ``error`` ("" or a reason) and ``prob_<class>`` for every
    class in ``class_names`` order; ``classify_bytes`` also ``features`` (the backbone's), and
    ``embed_bytes`` (input ``image_bytes``) the features alone (``features``, ``ok``).
    """
    import tensorflow as tf

    module = _serving_module(network, class_names, image_size)
    path = Path(path)
    tf.saved_model.save(
        module,
        str(path),
        signatures={"serving_default": module.serve, "classify_bytes": module.classify_bytes,
                    "embed_bytes": module.embed_bytes},
    )
    meta = dict(metadata, class_names=list(class_names), image_size=image_size)
    (path / "petalflow.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return path
