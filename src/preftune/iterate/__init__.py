"""``preftune iterate``: on-policy rounds of sample -> judge -> pairs -> train -> evaluate.

Each stage is a plain function with its inputs and outputs on disk under ``output_dir/round-N/``
(:mod:`.sampling`, :mod:`.judges`, :mod:`.pairs`, :mod:`.loop`), so resuming is "skip what is
complete". A round trains by calling the public :func:`preftune.train` on ``round-N/pairs.jsonl``.
The ``rounds:`` config section is :class:`.options.RoundsConfig` (a field of ``TrainConfig``).
"""

# preftune.config imports .options while it is being defined (after the helpers .options uses):
# importing it first makes either import order work.
from .. import config as _config  # noqa: F401
