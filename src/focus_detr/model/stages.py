"""Named stages of one forward pass, as ``torch.profiler.record_function`` ranges.

Every forward of :class:`~focus_detr.model.FocusDETR` runs its stages inside ranges named
``focus_detr.<stage>`` (in order: :data:`STAGES`), so they show up in any profiler trace
(``torch.profiler.profile``, Kineto/Perfetto, ``record_function`` nesting). Without an active profiler a
range costs a few microseconds per stage (one dispatcher call on entry and exit), nothing per operator.
:func:`observe_stages` (used by :func:`focus_detr.bench.flops.stage_hook` for FLOP counting and timing) calls
a function as each stage begins, at the cost of one Python call per stage: watching the ranges through a
dispatch mode instead would put a Python call on every operator and slow the many small operators of token
selection more than the rest, which biased focus/dense timings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch.profiler import record_function

#: Prefix of every stage range's name.
STAGE_PREFIX = "focus_detr."
#: The stages in the order a forward runs them: ``backbone`` (backbone + neck), ``preparation`` (flattened
#: tokens, positions, masks), ``token_selection`` (foreground scores and the cascade's token sets),
#: ``encoder``, ``query_selection`` (two-stage proposals, denoising queries) and ``decoder`` (decoder + heads).
STAGES = ("backbone", "preparation", "token_selection", "encoder", "query_selection", "decoder")


#: Functions called with each stage's name as it begins, and with ``"end"`` when the last stage ends
#: (:func:`observe_stages` adds and removes them; empty outside a benchmark).
_observers: list[Callable[[str], None]] = []


class stage:  # noqa: N801 - used like a function: ``with stage("encoder"):``
    """Context manager: the profiler range of stage ``name`` (one of :data:`STAGES`), announced to the
    observers of :func:`observe_stages`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.range = record_function(STAGE_PREFIX + name)

    def __enter__(self) -> "stage":
        for observer in _observers:
            observer(self.name)
        self.range.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.range.__exit__(*exc)
        if self.name == STAGES[-1]:
            for observer in _observers:
                observer("end")


@contextlib.contextmanager
def observe_stages(fn: Callable[[str], None]) -> Iterator[None]:
    """Call ``fn(stage)`` as each stage of any forward begins and ``fn("end")`` after the last one, while
    inside the block."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)
