"""Torch modules that run a model from CLAQ sections: ClaqLinear, ClaqEmbedding, ClaqTiedHead.

A ClaqLinear keeps its weight's packed sections on the device (resident memory close to the file's
size) and multiplies by them with the fastest kernel the device has:

| device | batch 1 (generation) | more rows (prompts, perplexity) |
|---|---|---|
| CPU | Numba product straight from the codes (`kernels_decode`) | Numba decode (whole, or column chunks) + matmul |
| CUDA with Triton | Triton LUT GEMV from the codes, all widths in one launch | Triton decode + cuBLAS |
| anything else | the portable Torch decoder (`torch_decoder.decode_claq`) + matmul | same |

On a CPU with AVX-512 the batch-1 product looks up 16 codes per instruction (`simd`; generation at 2.1-2.2x
the fp32 model's tokens/s on 2 cores, bench/decode.json); on other CPUs, the scalar-lookup Numba kernel.

`kernels="torch"` forces the portable decoder everywhere; it is also the bit-exact reference the tests
hold the kernels to ("numba" or "triton" force one kernel family; the tests run Triton's on the CPU
under TRITON_INTERPRET=1). Outliers are a sparse correction: decoding writes their values, products add
x[col] * (value - decoded code value) at their rows.
"""
from __future__ import annotations

import functools
import threading
from typing import Optional

import numpy as np
import torch

from ..format import spec
from ..format.huffman import with_fixed_codes
from ..format.rice import with_levels
from .torch_decoder import ClaqLayout, codebook_values, codes_at, decode_claq, to_torch

# CPU: batch rows up to which the Numba product is used; from 2 rows on, decoding column chunks that
# stay in cache and multiplying them measured faster (1536 x 576 4-bit, 2 cores: batch 8 1.5 ms by the
# product, 0.13 ms decode + a small matmul)
PRODUCT_MAX_ROWS = 1
# CUDA: batch rows up to which the Triton LUT product is used. Batch 1 (bench/decode-cuda.json, H200): the
# one-launch GEMV 16.0 us at 4096 x 4096 4-bit in CUDA graphs (cuBLAS on the fp16 weight 14.1 us), where
# decode + cuBLAS took 75.7 us by do_bench (the H100 run before it: 63.6); from 4 rows on, decode + cuBLAS wins.
TRITON_PRODUCT_MAX_ROWS = 1
# CPU, more than PRODUCT_MAX_ROWS rows: a weight of up to this many floats is decoded whole (fp32) and
# multiplied once; a larger one a chunk of this many at a time. A 512-token SmolLM2 forward on 2 cores
# took 1.17-1.31 s when every weight went a stream (width) at a time in chunks of 2**20 (the 49152-row
# head 21 columns a chunk, each rewriting all of y), 0.93-0.96 s now; fp32 0.87-0.91 s.
CHUNK_PARAMS = 1 << 22
KERNELS = ("auto", "torch", "numba", "triton")  # numba: CPU tensors; triton: CUDA (or TRITON_INTERPRET=1)


# Numba's thread count is per Python thread; it is set when torch's count is new to this thread, not
# read back on every call (numba.get_num_threads costs 1 us, and a generation step makes 211 products)
_numba_state = threading.local()


def _numba_threads() -> int:
    """Numba's thread count made to follow torch's (never above what Numba started with)."""
    wanted = torch.get_num_threads()
    if getattr(_numba_state, "torch_threads", None) != wanted:
        import numba

        _numba_state.threads = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(_numba_state.threads)
        _numba_state.torch_threads = wanted
    return _numba_state.threads


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class ClaqLinear(torch.nn.Module):
    """A Linear whose weight stays packed: y = x W^T + b computed from the codes (or from a cached decode)."""

    def __init__(self, rows: int, sections: dict[str, np.ndarray], bias: Optional[torch.Tensor] = None,
                 device="cpu", compute_dtype: torch.dtype = torch.float32, cache: bool = False, kernels: str = "auto"):
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
        # coded levels (format v3) become u8 levels, coded streams (v4) fixed-width words: once, here
        sections = with_fixed_codes(with_levels(sections), rows)
        self.out_features, self.in_features = rows, int(sections["bit_widths"].size)
        self.layout = ClaqLayout(np.asarray(sections["bit_widths"]), device)
        self.section_names = list(sections)
        for name, array in sections.items():
            self.register_buffer(name, to_torch(array, device), persistent=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(device), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.cache = cache
        self.kernels = kernels
        self._weight: Optional[torch.Tensor] = None
        self._prepare_streams()

    def _sections(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.section_names}

    def _prepare_streams(self) -> None:
        """Per width, each stream column's codebook as float32 values (the kernels' tables), and each
        outlier's correction for products: its value minus the codebook value its code points at."""
        sections = self._sections()
        values = codebook_values(sections, self.layout, torch.float32)
        self.widths = list(self.layout.columns)
        stream_index = torch.empty(self.in_features, dtype=torch.int64, device=values.device)
        for b, columns in self.layout.columns.items():
            entries = self.layout.starts[columns][:, None] + torch.arange(1 << b, device=values.device)
            self.register_buffer(f"tables_{b}", values[entries].contiguous(), persistent=False)
            stream_index[columns] = torch.arange(columns.numel(), device=values.device)
        if "outlier_counts" not in sections:
            return
        counts = sections["outlier_counts"].to(torch.int64)
        cols = torch.repeat_interleave(torch.arange(self.in_features, device=values.device), counts)
        rows = sections["outlier_rows"].to(torch.int64)
        coded = torch.empty(rows.numel(), dtype=torch.float32, device=values.device)
        widths = sections["bit_widths"].to(torch.int64)[cols]
        for b in self.widths:
            hit = widths == b
            position = stream_index[cols[hit]] * self.out_features + rows[hit]
            code = codes_at(sections[spec.code_section(b)], b, position)
            coded[hit] = getattr(self, f"tables_{b}")[stream_index[cols[hit]], code]
        self.register_buffer("outlier_cols", cols, persistent=False)
        self.register_buffer("outlier_rows_long", rows, persistent=False)
        self.register_buffer("outlier_fp32", sections["outlier_values"].float(), persistent=False)
        self.register_buffer("outlier_delta", sections["outlier_values"].float() - coded, persistent=False)

    def _streams(self):
        for b in self.widths:
            yield b, getattr(self, spec.code_section(b)), getattr(self, f"tables_{b}"), self.layout.columns[b]

    def _has_outliers(self) -> bool:
        return "outlier_delta" in self._buffers  # hasattr would raise and catch inside Module.__getattr__: 1 us a call

    def _path(self, device: torch.device) -> str:
        if self.kernels != "auto":
            return self.kernels
        if device.type == "cpu":
            return "numba"
        if device.type == "cuda" and _triton_available():
            return "triton"
        return "torch"

    def dequantize(self) -> torch.Tensor:
        """W[out, in] by the portable Torch decoder (the reference the kernels are tested against)."""
        return decode_claq(self.out_features, self._sections(), self.layout, self.compute_dtype)

    def decode(self, out_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """W[out, in] in the compute dtype, by the device's decode kernel (bit for bit the reference).

        `out_t`: a contiguous [in, out] buffer to decode into (float32 on the CPU kernels, else the
        compute dtype), reused across calls instead of fresh memory; W is returned as its transposed view.
        """
        path = self._path(self.bit_widths.device)
        if path == "torch":
            return self.dequantize()
        dtype = torch.float32 if path == "numba" else self.compute_dtype
        Wt = out_t if out_t is not None else torch.empty(self.in_features, self.out_features, dtype=dtype,
                                                         device=self.bit_widths.device)
        if Wt.shape != (self.in_features, self.out_features) or Wt.dtype != dtype or not Wt.is_contiguous():
            raise ValueError(f"out_t must be a contiguous {dtype} [{self.in_features}, {self.out_features}] tensor")
        self._decode_into(Wt, path)
        return Wt.T.to(self.compute_dtype)

    def _decode_into(self, Wt: torch.Tensor, path: str) -> None:
        """W^T into the contiguous [in, out] Wt by the "numba" or "triton" kernels, outliers included."""
        if path == "numba":
            from ..kernels.numba_decode import decode_stream

            _numba_threads()
            for b, words, tables, columns in self._numpy_streams():
                decode_stream(words, b, tables, columns, self.out_features, Wt.numpy())
        else:
            from ..kernels.triton_lut import decode_stream

            for b, words, tables, columns in self._streams():
                decode_stream(words, b, tables, columns, self.out_features, Wt)
        if self._has_outliers():
            Wt[self.outlier_cols, self.outlier_rows_long] = self.outlier_fp32.to(Wt.dtype)

    @property
    def weight(self) -> torch.Tensor:
        if self._weight is not None:
            return self._weight
        W = self.decode()
        if self.cache:
            self._weight = W
        return W

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T for x [..., in] (no bias), in x's dtype."""
        if self.cache:  # decoded once, then kept
            return torch.nn.functional.linear(x, self.weight.to(x.dtype))
        path = self._path(x.device)
        flat = x.detach().reshape(-1, self.in_features)
        if path == "torch" or (path == "triton" and flat.shape[0] > TRITON_PRODUCT_MAX_ROWS):
            return torch.nn.functional.linear(x, self.weight.to(x.dtype))
        if path == "numba":
            y = self._numba_matmul((flat if flat.dtype == torch.float32 else flat.float()).contiguous())
        else:
            y = self._triton_product(flat.contiguous())
        # a generation step makes ~200 of these calls: each torch call skipped is ~1 us of a ~20 ms token
        return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], self.out_features)

    def _outlier_correction(self, xf: torch.Tensor, y: torch.Tensor) -> None:
        if self._has_outliers():
            y.index_add_(1, self.outlier_rows_long, xf[:, self.outlier_cols] * self.outlier_delta)

    def _numpy_streams(self) -> list:
        """(b, words, tables, columns) as NumPy views of the CPU buffers, made once (a generation step
        calls every weight: per-call conversions cost more than a small weight's kernel), and again when
        the buffers have moved."""
        return self._numpy_plan()[0]

    def _numpy_plan(self) -> tuple:
        """(_numpy_streams, the batch-1 product's (kernel, words, tables, columns) per non-empty stream or
        None where a stream takes the general kernel), made once like the views."""
        at = self._buffers[spec.code_section(self.widths[0])].data_ptr()
        cached = self.__dict__.get("_numpy_views")
        if cached is None or cached[0] != at:
            from ..kernels.numba_decode import product1_kernel

            streams = [(b, w.numpy(), t.numpy(), c.cpu().numpy()) for b, w, t, c in self._streams()]
            plan = [(product1_kernel(b, self.out_features, c.size), w, t, c) for b, w, t, c in streams if c.size]
            cached = (at, streams, None if any(k is None for k, *_ in plan) else plan)
            self._numpy_views = cached
        return cached[1:]

    def _numba_matmul(self, xf: torch.Tensor) -> torch.Tensor:
        from ..kernels.numba_decode import decode_stream, product_stream

        threads = _numba_threads()
        if xf.shape[0] > PRODUCT_MAX_ROWS and self.in_features * self.out_features <= CHUNK_PARAMS:
            # many rows: decoded whole, one matmul
            Wt = torch.empty(self.in_features, self.out_features, dtype=torch.float32)
            self._decode_into(Wt, "numba")
            return torch.mm(xf, Wt)
        y = torch.zeros(xf.shape[0], self.out_features, dtype=torch.float32)
        streams, plan = self._numpy_plan()
        if xf.shape[0] == 1 and plan is not None:  # generation: the kernels chosen once, called straight
            x0, y0 = xf.numpy()[0], y.numpy()[0]
            for kernel, words, tables, columns in plan:
                kernel(words, tables, columns, self.out_features, x0, y0)
        elif xf.shape[0] <= PRODUCT_MAX_ROWS:
            x_np, y_np = xf.numpy(), y.numpy()
            for b, words, tables, columns in streams:
                product_stream(words, b, tables, columns, self.out_features, x_np, y_np, threads)
        else:  # a larger weight: a matmul per chunk of decoded columns of a stream
            step = max(1, CHUNK_PARAMS // self.out_features)
            local = torch.arange(min(step, self.in_features))
            buffer = torch.empty(local.numel(), self.out_features, dtype=torch.float32)
            for b, words, tables, columns in self._streams():
                for c0 in range(0, columns.numel(), step):
                    n = min(step, columns.numel() - c0)
                    decode_stream(words.numpy(), b, tables[c0:c0 + n].numpy(), local[:n].numpy(),
                                  self.out_features, buffer.numpy(), first=c0)
                    y.addmm_(xf[:, columns[c0:c0 + n]], buffer[:n])
        self._outlier_correction(xf, y)
        return y

    def _triton_product(self, flat: torch.Tensor) -> torch.Tensor:
        from ..kernels import triton_lut as kernels_triton

        y = torch.zeros(flat.shape[0], self.out_features, dtype=torch.float32, device=flat.device)
        plan = self._gemv_plan() if flat.shape[0] == 1 else None
        if plan is not None:  # every stream in one launch
            plan(flat, y)
        else:
            for b, words, tables, columns in self._streams():
                kernels_triton.lut_matmul_stream(words, b, tables, columns, self.out_features, flat, y)
        self._outlier_correction(flat.float(), y)
        return y

    def _gemv_plan(self):
        """The one-launch GEMV over the buffers (triton_lut.GemvPlan), made once, and again when they have
        moved (None where a stream is not word-aligned: those take one launch a stream)."""
        first = self._buffers[spec.code_section(self.widths[0])]
        at = (first.device, first.data_ptr())
        cached = self.__dict__.get("_gemv_work")
        if cached is None or cached[0] != at:
            from ..kernels import triton_lut as kernels_triton

            streams = [(words, b, tables, columns) for b, words, tables, columns in self._streams()]
            aligned = all(self.out_features * b % spec.WORD_BITS == 0 for _, b, _, _ in streams)
            plan = kernels_triton.GemvPlan(streams, self.out_features) if aligned else None
            cached = self._gemv_work = (at, plan)
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def packed_bytes(self) -> int:
        """Bytes of the file's sections held by this module (the kernels' float32 tables not counted)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.section_names)

    def extra_repr(self) -> str:
        widths = ",".join(str(b) for b in self.layout.columns)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={widths}, "
                f"cache={self.cache}, kernels={self.kernels}")


class ClaqEmbedding(ClaqLinear):
    """An embedding table E[vocab, hidden] stored as a CLAQ weight: a lookup decodes only the rows it reads.

    The whole table is still a ClaqLinear (`weight`, `matmul`), which ClaqTiedHead uses, so a tied
    embedding is stored and kept on the device once.
    """

    def __init__(self, rows: int, sections: dict[str, np.ndarray], device="cpu",
                 compute_dtype: torch.dtype = torch.float32, cache: bool = False, scale: Optional[torch.Tensor] = None,
                 kernels: str = "auto"):
        super().__init__(rows, sections, None, device, compute_dtype, cache, kernels)
        self.num_embeddings, self.embedding_dim = self.out_features, self.in_features
        # a scaled embedding (Gemma's: rows times sqrt(hidden), a buffer; XGLM's and BioGPT's, a float) keeps its
        # scale; the tied head reads unscaled rows
        self.register_buffer("embed_scale", None if scale is None else torch.as_tensor(scale).to(device),
                             persistent=False)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids] for a 1-D LongTensor of distinct, ascending row ids: [len(ids), hidden]."""
        sections = self._sections()
        codebooks = codebook_values(sections, self.layout, self.compute_dtype)
        out = torch.empty(ids.numel(), self.in_features, dtype=self.compute_dtype, device=ids.device)
        for b, columns in self.layout.columns.items():
            stream_col = torch.arange(columns.numel(), device=ids.device)
            codes = codes_at(sections[spec.code_section(b)], b, stream_col[None, :] * self.out_features + ids[:, None])
            out[:, columns] = codebooks[self.layout.starts[columns][None, :] + codes]
        if "outlier_counts" in sections:
            counts = sections["outlier_counts"].to(torch.int64)
            col_of = torch.repeat_interleave(torch.arange(self.in_features, device=ids.device), counts)
            row_of = sections["outlier_rows"].to(torch.int64)
            hit = torch.isin(row_of, ids)
            out[torch.searchsorted(ids, row_of[hit]), col_of[hit]] = sections["outlier_values"][hit].to(self.compute_dtype)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._weight is not None:
            out = torch.nn.functional.embedding(ids, self._weight)
        else:
            unique, inverse = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True)
            out = self.rows(unique)[inverse].view(*ids.shape, self.in_features)
        return out if self.embed_scale is None else out * self.embed_scale.to(out.dtype)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, " + super().extra_repr()


class ClaqTiedHead(torch.nn.Module):
    """The output head of a tied model: logits = x E^T, multiplied straight from the embedding's codes."""

    def __init__(self, embedding: ClaqEmbedding):
        super().__init__()
        self.embedding = embedding
        self.in_features, self.out_features = embedding.in_features, embedding.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.matmul(x)
