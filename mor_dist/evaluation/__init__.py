"""`mor eval`: lm-evaluation-harness on a run's model through its Hugging Face export (harness.py),
and local multiple-choice tasks that need no hub access (tasks.py)."""
