"""Hugging Face export: `mor export RUN -o OUT --hf` (export.py) and the self-contained modeling and
configuration files it copies into OUT (modeling_mor.py, configuration_mor.py: torch + transformers only);
loading.py builds an export's model from this package's own classes for `mor eval`, never from code in
the folder."""
