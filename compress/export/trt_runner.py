"""Run a serialized TensorRT engine on PyTorch CUDA tensors (latency measurement and deployment inference)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from compress.errors import DataError, ExportError
from compress.export._trt import gpu_identity, import_tensorrt, require_cuda
from compress.export.engine import read_sidecar

_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
           "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


def _device_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised I/O buffer on the engine's device."""
    return torch.empty(shape, dtype=dtype, device=device)


def _torch_dtype(trt, dtype) -> torch.dtype:
    for name, torch_dtype in _DTYPES.items():
        if getattr(trt.DataType, name, None) == dtype:
            return torch_dtype
    raise ExportError(f"engine tensor type {dtype} has no PyTorch equivalent here; export with float32 I/O")


class TensorRTRunner:
    """Deserializes an engine once; binds torch CUDA buffers; runs execute_async_v3 on its own stream.

    With cuda_graph=True the first execute() for a set of shapes captures the enqueue into a CUDA
    graph and later calls replay it, which removes per-kernel launch overhead. Every call into the
    execution context (shapes, addresses, enqueue) runs with the engine's device current: TensorRT
    works on the current CUDA device, which on a multi-GPU machine need not be the engine's.
    """

    def __init__(
        self, engine_path: str | os.PathLike, device: int | str | torch.device | None = None, cuda_graph: bool = False
    ) -> None:
        trt = import_tensorrt()
        require_cuda("running a TensorRT engine")
        self._trt = trt
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise ExportError(f"TensorRT engine {self.engine_path} does not exist; build it with build_engine")
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self.device = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        self.info = read_sidecar(self.engine_path)
        self.cuda_graph = cuda_graph
        with torch.cuda.device(self.device):
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self._engine is None:
                raise ExportError(self._deserialize_hint())
            self._context = self._engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        self.buffers: dict[str, torch.Tensor] = {}
        self._bound: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    def _deserialize_hint(self) -> str:
        here = f"TensorRT {self._trt.__version__} on {gpu_identity(self.device.index)[0]}"
        built = "an unknown TensorRT/GPU (no sidecar)"
        if self.info is not None:
            built = f"TensorRT {self.info.tensorrt_version} on {self.info.gpu_name}"
        return (f"TensorRT could not deserialize {self.engine_path}: it was built with {built}, this is {here}; "
                "engines are tied to both, rebuild it here with build_engine")

    def bind(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Set input shapes and (re)allocate I/O buffers; a no-op when the shapes are already bound."""
        key = tuple(tuple(int(d) for d in shapes[n]) for n in self.input_names)
        if key == self._bound:
            return self.buffers
        with torch.cuda.device(self.device):
            for name, shape in zip(self.input_names, key, strict=True):
                if not self._context.set_input_shape(name, shape):
                    low, _, high = self._engine.get_tensor_profile_shape(name, 0)
                    raise DataError(f"input '{name}' shape {shape} is outside the engine's profile "
                                    f"{tuple(low)}..{tuple(high)}; rebuild the engine with matching shapes")
            buffers = {}
            for name in self.input_names + self.output_names:
                # Output shapes are known only once every input shape is set, hence shapes first.
                shape = shapes[name] if name in shapes else tuple(self._context.get_tensor_shape(name))
                buffers[name] = _device_buffer(tuple(shape), self._dtypes[name], self.device)
                self._context.set_tensor_address(name, buffers[name].data_ptr())
        self.buffers, self._bound, self._graph = buffers, key, None
        return buffers

    def _enqueue(self) -> None:
        with torch.cuda.device(self.device):
            ok = self._context.execute_async_v3(self.stream.cuda_stream)
        if not ok:
            raise ExportError(f"TensorRT execute_async_v3 failed for {self.engine_path}; see the TensorRT log")

    def _capture(self) -> None:
        # One plain run first, as TensorRT asks before capture, so deferred shape-dependent setup is done.
        self._enqueue()
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._enqueue()
        self._graph = graph

    def execute(self) -> None:
        """Run the engine once on the bound buffers, enqueued on self.stream (asynchronous)."""
        if self._bound is None:
            raise DataError("no shapes bound; call bind() (or infer()) before execute()")
        if not self.cuda_graph:
            self._enqueue()
            return
        with torch.cuda.device(self.device):
            if self._graph is None:
                self._capture()
            with torch.cuda.stream(self.stream):
                self._graph.replay()

    def infer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Disparity (B x 1 x H x W) for B x 3 x H x W images in 0..255, as a CUDA tensor."""
        if len(self.input_names) != 2 or len(self.output_names) != 1:
            raise ExportError(f"engine has inputs {self.input_names} and outputs {self.output_names}; expected "
                              "(left, right) -> disp as to_onnx exports")
        if left.shape != right.shape or left.dim() != 4:
            raise DataError(f"left {tuple(left.shape)} and right {tuple(right.shape)} must both be B x 3 x H x W")
        buffers = self.bind(dict(zip(self.input_names, (tuple(left.shape), tuple(right.shape)), strict=True)))
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for name, image in zip(self.input_names, (left, right), strict=True):
                buffers[name].copy_(image, non_blocking=True)
            self.execute()
        caller.wait_stream(self.stream)
        return buffers[self.output_names[0]].float().clone()

    def run(self, left: np.ndarray | torch.Tensor, right: np.ndarray | torch.Tensor) -> np.ndarray:
        """Deployment entry point: images (numpy or torch, B x 3 x H x W or 3 x H x W) -> disparity numpy."""
        tensors = []
        for image in (left, right):
            t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
            tensors.append((t[None] if t.dim() == 3 else t).to(self.device, torch.float32))
        return self.infer(*tensors).cpu().numpy()
