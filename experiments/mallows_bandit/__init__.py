"""MallowsPO synthetic experiments: a dispersion-aware preference bandit and the entropy-based
dispersion estimator, run with preftune's own losses. See RESULTS.md; run with
`python -m experiments.mallows_bandit` from the repository root."""
