"""Comparison helper for the golden parity tests (Testing/golden: the tolerances the fixtures were checked to)."""

from __future__ import annotations

import torch

FLOAT64_ATOL = 1e-10


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Float tensors: float64 within 1e-10 absolute; float32 within 1e-4 * max|ref| + 1e-6 (and exact for
    integer and boolean tensors)."""
    shapes = tuple(actual.shape), tuple(expected.shape)
    assert shapes[0] == shapes[1], f"{name}: shape {shapes[0]} != {shapes[1]}"
    if not expected.is_floating_point():
        mismatches = int((actual.cpu() != expected).sum())
        assert mismatches == 0, f"{name}: {mismatches} entries differ"
        return
    actual = actual.detach().cpu().double()
    reference = expected.double()
    # Masked logits hold -inf: those entries must agree exactly, the rest numerically.
    finite = torch.isfinite(reference)
    assert torch.equal(actual[~finite], reference[~finite]), f"{name}: non-finite entries differ"
    actual, reference = actual[finite], reference[finite]
    float32_tol = 1e-4 * float(reference.abs().max()) + 1e-6 if reference.numel() else 1e-6
    tol = FLOAT64_ATOL if expected.dtype == torch.float64 else float32_tol
    diff = float((actual - reference).abs().max()) if reference.numel() else 0.0
    assert diff <= tol, f"{name}: max abs diff {diff:.3e} > {tol:.1e}"
