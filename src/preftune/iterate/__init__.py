"""``preftune iterate``: on-policy rounds of sample -> judge -> pairs -> train -> evaluate.

Each stage is a plain function with its inputs and outputs on disk under ``output_dir/round-N/``
(:mod:`.stages`, :mod:`.training`; run in order by :mod:`.loop`), so resuming is "skip what is
complete". A round trains by calling the public :func:`preftune.train` on ``round-N/pairs.jsonl``.
The ``rounds:`` config section is :class:`preftune.config.RoundsConfig` (a field of ``TrainConfig``).
"""
