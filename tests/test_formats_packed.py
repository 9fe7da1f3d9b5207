"""GPTQ / AWQ packing (``quantfix.formats.packed``): the int32 layouts unpacked by hand; the reads
against AutoRound's own writer and dequantizers are in test_formats.py."""
import torch

from quantfix.formats import packed


def test_gptq_unpack_roundtrip_and_v1_zero_offset():
    q = torch.randint(0, 16, (64, 24), dtype=torch.int32)
    packed_q = sum(q.reshape(8, 8, 24)[:, k, :] << (4 * k) for k in range(8))
    assert torch.equal(packed.unpack_rows(packed_q.to(torch.int32), 4), q)
    z = torch.randint(1, 16, (2, 24), dtype=torch.int32)
    stored = z - 1  # v1 writes zero - 1
    packed_z = sum(stored.reshape(2, 3, 8)[:, :, k] << (4 * k) for k in range(8))
    qq, zz = packed.gptq_ints(packed_q.to(torch.int32), packed_z.to(torch.int32), 4, v1=True)
    assert torch.equal(zz, z) and torch.equal(qq, q)
