"""Evaluation: the test report with its plots, the drift reference the evaluate stage writes, and the
drift checks the monitor runs on new images.
"""
