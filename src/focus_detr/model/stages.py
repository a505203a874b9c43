"""Named stages of one forward pass, as ``torch.profiler.record_function`` ranges.

Every forward of :class:`~focus_detr.model.FocusDETR` runs its stages inside ranges named
``focus_detr.<stage>`` (in order: :data:`STAGES`), so they show up in any profiler trace
(``torch.profiler.profile``, Kineto/Perfetto, ``record_function`` nesting). Without an active profiler a
range costs a few microseconds per stage (one dispatcher call on entry and exit), nothing per operator.
:func:`focus_detr.bench.flops.stage_hook` turns the ranges into callbacks for FLOP counting and timing.
"""

from __future__ import annotations

from torch.profiler import record_function

#: Prefix of every stage range's name.
STAGE_PREFIX = "focus_detr."
#: The stages in the order a forward runs them: ``backbone`` (backbone + neck), ``preparation`` (flattened
#: tokens, positions, masks), ``token_selection`` (foreground scores and the cascade's token sets),
#: ``encoder``, ``query_selection`` (two-stage proposals, denoising queries) and ``decoder`` (decoder + heads).
STAGES = ("backbone", "preparation", "token_selection", "encoder", "query_selection", "decoder")


def stage(name: str) -> record_function:
    """Context manager: the profiler range of stage ``name`` (one of :data:`STAGES`)."""
    return record_function(STAGE_PREFIX + name)
