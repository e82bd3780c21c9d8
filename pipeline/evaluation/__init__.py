"""Evaluation: the nets' figures on the held-out faces, the report and the pictures."""
