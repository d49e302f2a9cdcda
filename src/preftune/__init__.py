"""preftune: preference optimization for causal language models.

DPO and its relatives, plus MRPO (multi-reference), MallowsPO (preference dispersion) and RPO
(relative preference optimization), built as one pipeline:

    data -> scoring -> references -> embeddings -> losses -> trainer -> evaluation / reports
"""

# The one place the version is written: pyproject.toml reads it ([tool.setuptools.dynamic]).
__version__ = "0.1.0"


def train(config, overrides=None):
    """Train as the config (a YAML path, a dict or a TrainConfig) says; see preftune.trainer.train.
    With ``generation_eval: true`` the held-out prompts are answered afterwards, as ``preftune train``
    does (preftune.generation_eval.generation_eval; the answer metrics are in ``result.last_metrics``)."""
    from .generation_eval import train_and_evaluate

    return train_and_evaluate(config, overrides)[0]
