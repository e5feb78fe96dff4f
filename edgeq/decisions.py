"""Each decision of a build, measured here or replayed from a plan: two implementations of one verb.

A decision lives in a table of the plan (`FamilyPlan.precision`, `.ships`, `.accuracy`, `.pruning`,
...) under a key. `Measured.decide` runs the measurement and records its result there; `Replayed.decide`
takes the recorded result (a plan without it is refused in one line) and, where the result is a claim
about accuracy, re-measures it on the file it builds (`replay`): a plan says what to build, never what
the build achieved. The stages call `decide` and never ask which of the two they hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from edgeq.plan import BuildPlan, PlanError

Record = dict


def plain(record: Record) -> Record:
    """As JSON holds it, so that a measured build and its replay write the same manifest."""
    return json.loads(json.dumps(record))


class Measured:
    """Decisions measured on this machine and recorded into `plan`."""

    replaying = False

    def __init__(self, plan: BuildPlan):
        self.plan = plan

    def decide(self, table: dict, key: str, what: str, measure: Callable[[], Record],
               replay: Callable[[Record], Record] | None = None) -> Record:
        table[key] = plain(measure())
        return table[key]


class Replayed:
    """Decisions taken from a previous export's plan; claims about accuracy are re-measured."""

    replaying = True

    def __init__(self, plan: BuildPlan):
        self.plan = plan

    def decide(self, table: dict, key: str, what: str, measure: Callable[[], Record],
               replay: Callable[[Record], Record] | None = None) -> Record:
        if key not in table:
            raise PlanError(f"{self.plan.where}: has no {what}; it was made by another edgeq or for other variants: "
                            "re-measure (edgeq export without --plan)")
        return replay(table[key]) if replay is not None else table[key]


Decisions = Measured | Replayed
