"""The analysis layer: pure functions from frames to figures (no I/O).

    frames = build_frames(samples, tracked)      # detaudit.analysis.frame
    result = analyze(frames, threshold_pct=0.01, probe_kind="outcome")
    result.to_dict()                             # the JSON summary
"""

from detaudit.analysis.frame import Frames, build_frames
from detaudit.analysis.summary import Analysis, TokenResult, analyze

__all__ = ["Analysis", "Frames", "TokenResult", "analyze", "build_frames"]
