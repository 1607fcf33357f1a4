"""The greedy width search on measured-cost tables (no TensorFlow: the costs are given)."""

from __future__ import annotations

import math

from qpipe_litert.search import CostTable, assignment_after, bits_per_weight, greedy_steps, steps_for_size
from qpipe_litert.widths import Cost, Layer


def _layers():
    return [Layer(0, "CONV_2D", "a;", "a", 1000), Layer(1, "DEPTHWISE_CONV_2D", "b;", "b", 100),
            Layer(2, "FULLY_CONNECTED", "c;", "c", 4000)]


def _costs(**broken):
    rows = [  # (layer, width, runs, error, bytes saved)
        (0, "int2", False, math.inf, 900), (0, "int4", True, 0.5, 800), (0, "int8", True, 0.001, 700),
        (1, "int4", False, math.inf, 0), (1, "int8", True, 0.001, 70),
        (2, "int2", True, 0.02, 3600), (2, "int4", True, 0.001, 3400), (2, "int8", True, 0.0001, 2900),
    ]
    return [Cost(layer, "OP", "n", width, runs and (layer, width) not in broken.get("off", ()), error, None, saved)
            for layer, width, runs, error, saved in rows]


def test_greedy_narrows_the_cheapest_error_per_byte_first_and_never_offers_what_does_not_run():
    table = CostTable(_layers(), _costs(), allow_float=False)
    start, steps = greedy_steps(table)
    assert start == {0: "int8", 1: "int8", 2: "int8"}  # depthwise starts (and stays) at int8
    assert [(s.layer, s.after) for s in steps] == [(2, "int4"), (2, "int2"), (0, "int4")]
    assert table.offered[0] == ["int4", "int8"] and table.offered[1] == ["int8"]
    final = assignment_after(start, steps, len(steps))
    assert final == {0: "int4", 1: "int8", 2: "int2"}
    assert bits_per_weight(_layers(), final) == (4 * 1000 + 8 * 100 + 2 * 4000) / 5100


def test_size_budget_takes_the_shortest_prefix_that_fits():
    table = CostTable(_layers(), _costs(), allow_float=False)
    start, steps = greedy_steps(table)
    float_bytes = 10_000
    at_start = table.predict(start, float_bytes)["size_bytes"]
    assert at_start == 10_000 - 700 - 70 - 2900
    assert steps_for_size(table, start, steps, float_bytes, at_start) == 0
    assert steps_for_size(table, start, steps, float_bytes, at_start - 1) == 1  # int4 dense saves 500 more
    assert steps_for_size(table, start, steps, float_bytes, at_start - 501) == 2
    assert steps_for_size(table, start, steps, float_bytes, 0) == len(steps)  # unreachable: everything


def test_a_layer_with_no_runnable_width_stays_float_with_a_reason():
    costs = _costs(off={(1, "int8")})
    table = CostTable(_layers(), costs, allow_float=False)
    start, _ = greedy_steps(table)
    assert start[1] == "float" and table.offered[1] == ["float"]
    assert "no quantized width runs" in table.reasons[1]


def test_with_float_offered_the_search_starts_float_and_a_budget_keeps_the_most_sensitive_layer_float():
    costs = _costs()
    costs[4] = Cost(1, "OP", "n", "int8", True, 1.0, None, 70)  # the depthwise layer: int8 hurts
    table = CostTable(_layers(), costs, allow_float=True)
    start, steps = greedy_steps(table)
    assert start == {0: "float", 1: "float", 2: "float"}
    assert table.offered[1] == ["int8", "float"]
    # float -> int8 on the big dense layer first (tiny error per byte), the sensitive depthwise last
    assert (steps[0].layer, steps[0].before, steps[0].after) == (2, "float", "int8")
    assert (steps[-1].layer, steps[-1].after) == (1, "int8")
    # a budget with room for 100 more bytes than the all-narrow file leaves exactly that layer float
    float_bytes = 10_000
    narrowest = table.predict(assignment_after(start, steps, len(steps)), float_bytes)["size_bytes"]
    count = steps_for_size(table, start, steps, float_bytes, narrowest + 100)
    assert count == len(steps) - 1 and assignment_after(start, steps, count)[1] == "float"
