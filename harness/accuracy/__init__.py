"""`nox -s accuracy`: lm-eval on the float model and every configured scheme in one run, gated on recovery.

`tasks/` is the lm-eval task directory (local jsonl data), `gates` the recovery arithmetic, `run` the session's
entry point, `evaluate` one model's lm-eval run (a subprocess each), `exact` the kernel-vs-exact perplexity loop and
`report` the markdown report with its plot. Only `gates` is imported by the unit tests: it needs nothing but Python.
"""
