"""Tracking: TensorBoard event writing for every stage, the multi-experiment board, and the Markdown
review of what an experiment changed.
"""
