"""Quality, run: the commands and sessions that load a reference and a candidate through the runtimes and score
them with the library in quantlab/quality/ (`session.py`: one evaluation; `command.py`: `quantlab quality`;
`sensitivity*.py`: `quantlab sensitivity`). The quality section's checks before any weights load are the plan's
(quantlab/plan_quality.py).
"""
