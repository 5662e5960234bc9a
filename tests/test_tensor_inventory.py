"""A weight file's tensors against the expected ones: every kind of problem in one list."""

from flux_jax.tensor_inventory import SHOWN_NAMES, inventory_problems


def test_matching_tensors_have_no_problems():
    assert inventory_problems({"a": (2, 3), "b": [4]}, {"a": [2, 3], "b": (4,)}) == []


def test_missing_unexpected_and_misshapen_tensors_are_each_named():
    problems = inventory_problems(
        {"a": (2, 3), "extra": (1,), "c": (5, 5)}, {"a": (2, 3), "b": (4,), "c": (5, 6)}
    )
    assert problems == [
        "missing tensors (1): b",
        "unexpected tensors (1): extra",
        "shape mismatches (1): c: checkpoint (5, 5), expected (5, 6)",
    ]


def test_long_lists_are_cut_and_counted():
    expected = {f"t{i}": (1,) for i in range(SHOWN_NAMES + 3)}
    (problem,) = inventory_problems({}, expected)
    assert problem.startswith(f"missing tensors ({SHOWN_NAMES + 3}): t0, t1, ")
    assert problem.endswith(f"t{SHOWN_NAMES - 1}, ... (+3 more)")
