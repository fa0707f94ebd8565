"""AVX-512 table lookups for the Numba kernels: 16 codes looked up by one instruction.

A codebook of 16 float32 values fits one zmm register, and `vpermps` (_mm512_permutexvar_ps) picks
16 of its entries by 16 indices at once; `vpermi2ps` does the same from two registers, 32 entries.
LLVM does not vectorise a table lookup into these (it makes gathers or scalar loads), so the
kernels call them through these intrinsics, which emit the LLVM IR by hand and keep the vectors in
a Numba type of their own (`Lanes`, an LLVM vector: LLVM splits a long one into zmm registers):

    acc = zeros(64)                                  # <64 x float>, four zmm registers
    codes = unpack(words, byte, 4, 64)               # 64 codes of 4 bits from 32 bytes
    acc = add(acc, lookup(tables, c, codes, 16))     # tables[c, codes[i]], 4 x vpermps
    add_to(y, r0, acc, 4)                            # y[r0:r0+64] += acc, back in row order
    store_to(out, r0, lookup(tables, c, codes, 16), 4)   # out[r0:r0+64] = the entries (decoding)

A lookup reads only the low log2(E) bits of each code (E entries in a table row); `unpack` leaves
higher bits unmasked, so a narrower codebook is repeated to 16 entries by the caller. Tables of 64 to
256 entries are 32-entry pieces, chosen between by code bits 5, 6, 7.

Use only where `available()`: the instructions need AVX-512F (the byte shuffles of `unpack` are
plain LLVM IR and take whatever the CPU has: vpshufb/vpermb of AVX-512BW/VBMI on the AMD EPYC (Zen 5)
this was measured on). The intrinsics do no bounds checks; the kernels that call them do the
arithmetic. Numba's cache of those kernels knows only their own file's timestamp: after editing this
one, touch numba_decode.py (or remove claq_convert/kernels/__pycache__/*.nbi).
"""
from __future__ import annotations

import functools

from llvmlite import ir
from numba import types
from numba.core.datamodel import models, register_default
from numba.core.errors import TypingError
from numba.extending import intrinsic

_F32, _I32, _I8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
_ZMM_F, _ZMM_I = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether Numba compiles for a CPU with AVX-512F: the host's, or (NUMBA_CPU_NAME set) the one
    NUMBA_CPU_FEATURES names, counted only when it lists +avx512f."""
    import numba
    from llvmlite import binding

    if numba.config.DISABLE_JIT:  # intrinsics exist only in compiled code
        return False
    if numba.config.CPU_NAME not in (None, "host"):
        return "+avx512f" in (numba.config.CPU_FEATURES or "").split(",")
    try:
        return bool(binding.get_host_cpu_features().get("avx512f", False))
    except RuntimeError:  # LLVM cannot tell on some hosts
        return False


class Lanes(types.Type):
    """n float32 or int32 values in one LLVM vector (registers, never memory, once LLVM is done)."""

    def __init__(self, kind: str, n: int):
        self.kind, self.n = kind, n
        super().__init__(name=f"Lanes({kind} x {n})")


@register_default(Lanes)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_F32 if fe_type.kind == "f32" else _I32, fe_type.n))


def _literal(value, what: str) -> int:
    if not isinstance(value, types.IntegerLiteral):
        raise TypingError(f"{what} must be a compile-time constant")
    return value.literal_value


def _check_array(array, dtype, what: str) -> None:
    """The intrinsics address an array's data by element offsets: it must be C-contiguous."""
    ok = isinstance(array, types.Array) and array.layout == "C"
    if not (ok and (isinstance(array.dtype, types.Integer) if dtype is None else array.dtype == dtype)):
        raise TypingError(f"{what} must be a C-contiguous {dtype or 'integer'} array, not {array}")


def _address(context, builder, array_type, array, index, vector_type):
    """Pointer to array.data[index] (in elements of the array's dtype) as a vector_type pointer."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), vector_type.as_pointer())


def _declare(builder, name: str, ret, args):
    try:
        return builder.module.get_global(name)
    except KeyError:
        return ir.Function(builder.module, ir.FunctionType(ret, args), name=name)


def _concat(builder, parts):
    """One vector from several of the same type, in order (free: LLVM keeps them as registers)."""
    while len(parts) > 1:
        n = parts[0].type.count
        mask = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
        parts = [builder.shuffle_vector(parts[i], parts[i + 1], mask) for i in range(0, len(parts), 2)]
    return parts[0]


def _lookup16(builder, tables, index):
    """tables[index[i]] for 16 lanes, tables 16 * len(tables) float32 entries in zmm registers."""
    if len(tables) == 1:
        permute = _declare(builder, "llvm.x86.avx512.permvar.sf.512", _ZMM_F, [_ZMM_F, _ZMM_I])
        return builder.call(permute, [tables[0], index])
    permute2 = _declare(builder, "llvm.x86.avx512.vpermi2var.ps.512", _ZMM_F, [_ZMM_F, _ZMM_I, _ZMM_F])
    level = [builder.call(permute2, [tables[i], index, tables[i + 1]]) for i in range(0, len(tables), 2)]
    bit = 5  # 32-entry pieces chosen between by bits 5, 6, 7
    while len(level) > 1:
        high = builder.icmp_unsigned("!=", builder.and_(index, ir.Constant(_ZMM_I, [1 << bit] * 16)),
                                     ir.Constant(_ZMM_I, None))
        level = [builder.select(high, level[i + 1], level[i]) for i in range(0, len(level), 2)]
        bit += 1
    return level[0]


@intrinsic
def zeros(typingctx, n):
    """<n x float> of zeros."""
    N = _literal(n, "n")

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.VectorType(_F32, N), None)

    return Lanes("f32", N)(n), codegen


@intrinsic
def add(typingctx, a, b):
    """a + b, lane by lane."""
    if not (isinstance(a, Lanes) and a == b and a.kind == "f32"):
        raise TypingError("add takes two float Lanes of one length")

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


def lane_rows(bits: int, n: int) -> list[int]:
    """The row of a tile of n codes that each lane of `unpack` holds. Widths dividing 8 come in byte
    order: lane k*m + j holds the code in bits k*bits.. of byte j (row j*8/bits + k; m = n*bits/8
    bytes), so unpacking is a zero extension and a shift per code of a byte; others in row order."""
    if 8 % bits:
        return list(range(n))
    m, per_byte = n * bits // 8, 8 // bits
    return [j * per_byte + k for k in range(per_byte) for j in range(m)]


def _load_bytes(context, builder, array_type, array, byte, size):
    data = context.make_array(array_type)(context, builder, array).data
    start = builder.gep(builder.bitcast(data, _I8.as_pointer()), [byte])
    return builder.load(builder.bitcast(start, ir.VectorType(_I8, size).as_pointer()), align=1)


@intrinsic
def unpack(typingctx, words, byte, bits, n):
    """The n codes of `bits` bits packed LSB first from byte offset `byte` of `words` (any integer
    array) as <n x i32> in the lanes `lane_rows(bits, n)` names: each code in its lane's bits
    0..bits-1, the higher bits unmasked. Reads exactly n * bits / 8 bytes; n a power of two from 32.

    Widths dividing 8: bytes zero-extended to lanes, shifted by 0, bits, ... (vpmovzxbd, vpsrld).
    Others, 32 codes (4 * bits bytes) at a time: each lane gets the two bytes its code starts in (a
    byte shuffle), shifted right by the code's bit offset in the first; a load and shuffle wider
    than 32 codes measured 1.5x slower (6 bits)."""
    B, N = _literal(bits, "bits"), _literal(n, "n")
    _check_array(words, None, "words")
    if not 1 <= B <= 8 or N < 32 or N & (N - 1):
        raise TypingError(f"unpack takes 32, 64, 128 ... codes of 1 to 8 bits, not {N} of {B}")

    def codegen(context, builder, signature, args):
        if 8 % B == 0:
            size = N * B // 8
            wide = builder.zext(_load_bytes(context, builder, signature.args[0], args[0], args[1], size),
                                ir.VectorType(_I32, size))
            return _concat(builder, [builder.lshr(wide, ir.Constant(wide.type, [k * B] * size)) for k in range(8 // B)])
        pick = [b for r in range(32) for b in ((r * B) >> 3, min(((r * B) >> 3) + 1, 4 * B - 1), 0, 0)]
        shifts = ir.Constant(ir.VectorType(_I32, 32), [(r * B) & 7 for r in range(32)])
        pieces = []
        for q in range(N // 32):
            at = builder.add(args[1], ir.Constant(args[1].type, 4 * B * q))
            packed = _load_bytes(context, builder, signature.args[0], args[0], at, 4 * B)
            pairs = builder.shuffle_vector(packed, ir.Constant(packed.type, None),
                                           ir.Constant(ir.VectorType(_I32, 128), pick))
            pieces.append(builder.lshr(builder.bitcast(pairs, shifts.type), shifts))
        return _concat(builder, pieces)

    return Lanes("i32", N)(words, byte, bits, n), codegen


@intrinsic
def lookup(typingctx, tables, c, codes, entries):
    """tables[c, codes[r]] for every lane r: tables float32 [*, entries], entries 16, 32, 64, 128 or
    256; only the low log2(entries) bits of a code are read."""
    E = _literal(entries, "entries")
    _check_array(tables, types.float32, "tables")
    if E not in (16, 32, 64, 128, 256) or not (isinstance(codes, Lanes) and codes.kind == "i32"):
        raise TypingError("lookup takes int Lanes and a table of 16 to 256 entries")
    N = codes.n

    def codegen(context, builder, signature, args):
        row = builder.mul(args[1], ir.Constant(args[1].type, E))
        tables_ = [builder.load(_address(context, builder, signature.args[0], args[0],
                                         builder.add(row, ir.Constant(row.type, 16 * q)), _ZMM_F), align=4)
                   for q in range(E // 16)]
        index = [builder.shuffle_vector(args[2], ir.Constant(args[2].type, None),
                                        ir.Constant(_ZMM_I, list(range(16 * j, 16 * j + 16)))) for j in range(N // 16)]
        return _concat(builder, [_lookup16(builder, tables_, i) for i in index])

    return Lanes("f32", N)(tables, c, codes, entries), codegen


def _row_order_writer(accumulate: bool):
    """The intrinsic that writes float Lanes back to y in row order (lane_rows): y[...] += values, or =."""
    what = "add_to" if accumulate else "store_to"

    def typer(typingctx, y, start, values, bits):
        _check_array(y, types.float32, "y")
        if not (isinstance(values, Lanes) and values.kind == "f32"):
            raise TypingError(f"{what} takes float Lanes")
        rows = lane_rows(_literal(bits, "bits"), values.n)
        lane_of_row = [rows.index(r) for r in range(values.n)]

        def codegen(context, builder, signature, args):
            ordered = builder.shuffle_vector(args[2], ir.Constant(args[2].type, None),
                                             ir.Constant(ir.VectorType(_I32, len(rows)), lane_of_row))
            p = _address(context, builder, signature.args[0], args[0], args[1], ordered.type)
            builder.store(builder.fadd(builder.load(p, align=4), ordered) if accumulate else ordered, p, align=4)
            return context.get_dummy_value()

        return types.none(y, start, values, bits), codegen

    typer.__name__ = what
    return intrinsic(typer)


# y[start + lane_rows(bits, n)[i]] += values[i] (y float32, contiguous): values back in row order
add_to = _row_order_writer(accumulate=True)
# y[start + lane_rows(bits, n)[i]] = values[i]: the same, stored (decoding)
store_to = _row_order_writer(accumulate=False)
