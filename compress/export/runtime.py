"""ONNX Runtime sessions and the random stereo inputs every check and benchmark feeds."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from compress.errors import DataError, ExportError, MissingDependencyError

INPUT_NAMES: tuple[str, str] = ("left", "right")
OUTPUT_NAME = "disp"
METADATA_PREFIX = "ffsc."
"""The prefix of the metadata keys ``to_onnx`` records (``ffsc.iters``, ``ffsc.version``, ...)."""


def random_stereo_pair(
    batch: int, height: int, width: int, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random RGB images, uniform in 0..255 (never all zeros, which hides normalisation bugs)."""
    gen = torch.Generator().manual_seed(seed)
    pair = torch.rand(2, batch, 3, height, width, generator=gen) * 255.0
    return pair[0].to(device), pair[1].to(device)


ORT_INSTALL_HINT = ("pip install -e \".[cpu]\" (onnxruntime), or \".[gpu]\" on a CUDA machine (onnxruntime-gpu); "
                    "never both: the two share one module")
"""How to install ONNX Runtime: the two builds are separate extras because installed together they break each other."""


def import_onnxruntime():
    """The onnxruntime module, or one line saying which extra installs it."""
    # Lazy: a TensorRT- or torch-only install runs without ONNX Runtime, and the CPU and GPU builds are alternatives.
    try:
        # onnxruntime is an optional extra (the cpu or the gpu build): imported where a session is made
        import onnxruntime
    except ImportError as err:
        raise MissingDependencyError(f"ONNX Runtime is not installed: {ORT_INSTALL_HINT}") from err
    return onnxruntime


def ort_providers(device: str | torch.device, require: bool) -> list[str]:
    """Execution providers for a device: CUDA when asked for and present, else CPU (or an error if required)."""
    ort = import_onnxruntime()

    device = torch.device(device)
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if require:
            raise MissingDependencyError(
                "ONNX Runtime has no CUDAExecutionProvider here (found "
                f"{ort.get_available_providers()}); install the GPU build to run ONNX models on CUDA: "
                f"{ORT_INSTALL_HINT}")
    elif device.type != "cpu":
        raise DataError(f"ONNX Runtime runs on 'cpu' or 'cuda', got device '{device}'")
    return ["CPUExecutionProvider"]


def make_session(
    model: str | os.PathLike | bytes,
    device: str | torch.device = "cpu",
    intra_op_threads: int | None = None,
    require_device: bool = False,
):
    """An ONNX Runtime InferenceSession with all graph optimisations on, for a path or serialized model."""
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    source = model if isinstance(model, bytes) else str(Path(model))
    try:
        return ort.InferenceSession(source, sess_options=options,
                                    providers=ort_providers(device, require_device))
    except MissingDependencyError:
        raise
    except Exception as err:
        what = "the serialized model" if isinstance(model, bytes) else str(model)
        raise ExportError(f"ONNX Runtime could not load {what}: {err}") from err


@functools.lru_cache(maxsize=4)
def _cached_session(path: str, mtime_ns: int, size: int, device: str):
    del mtime_ns, size  # part of the cache key only: a rewritten file gets a new session
    return make_session(path, device, require_device=True)


def _as_image_batch(name: str, image: np.ndarray | torch.Tensor) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise DataError(f"{name} image has shape {tuple(array.shape)}; expected B x 3 x H x W (or 3 x H x W) RGB")
    return np.ascontiguousarray(array, dtype=np.float32)


def run_onnx(
    path: str | os.PathLike,
    left: np.ndarray | torch.Tensor,
    right: np.ndarray | torch.Tensor,
    device: str = "cpu",
) -> np.ndarray:
    """Disparity (B x 1 x H x W float32) of an exported stereo model for RGB 0..255 images."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model {path} does not exist; export one with to_onnx / `ffsc export`")
    left_np, right_np = _as_image_batch("left", left), _as_image_batch("right", right)
    if left_np.shape != right_np.shape:
        raise DataError(f"left image is {left_np.shape} but right is {right_np.shape}; they must match")
    b, _, h, w = left_np.shape
    if h % 32 or w % 32:
        raise DataError(f"images are {h}x{w}; height and width must be multiples of 32 (pad them first)")
    stat = path.stat()
    session = _cached_session(str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device))
    try:
        (disp,) = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: left_np, INPUT_NAMES[1]: right_np})
    except Exception as err:
        fixed = [d if isinstance(d, int) else None for d in session.get_inputs()[0].shape]
        ours = any(k.startswith(METADATA_PREFIX) for k in session.get_modelmeta().custom_metadata_map)
        static = (f"; it takes only {fixed[2]}x{fixed[3]} (height x width) inputs (a static shape"
                  + ("; re-export with dynamic=True for others)" if ours else ", and was not exported by ffsc)")
                  if len(fixed) == 4 and fixed[2] and fixed[3] and (fixed[2], fixed[3]) != (h, w) else "")
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"ONNX Runtime failed to run {path} on {left_np.shape} inputs{static}: {reason}") from err
    if disp.shape != (b, 1, h, w):
        raise ExportError(f"{path} returned shape {disp.shape}; expected {(b, 1, h, w)}")
    return disp
