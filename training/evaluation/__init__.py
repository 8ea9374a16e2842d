"""Scoring captions and showing them: metrics, the robustness report, sample and attention plots."""
