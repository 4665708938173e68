"""Ratings on served completions, stored durably and turned into new training data."""

from toolkit.feedback.export import detect_language, export_feedback
from toolkit.feedback.store import FeedbackStore, RatedCompletion

__all__ = ["FeedbackStore", "RatedCompletion", "detect_language", "export_feedback"]
