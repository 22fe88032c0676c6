"""Evaluation: independent instruments that score what a model generates.

Instruments never share components with the model under test (the speech instrument is pocketsphinx,
not a learned speech tokenizer), so a model cannot pass by agreeing with itself.
"""
