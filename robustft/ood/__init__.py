"""OOD scoring, metrics and evaluation reports."""

import robustft.ood.clip_scores  # noqa: F401 - registers the CLIP scores (mcm, glmcm, neglabel) in SCORES
import robustft.ood.clipn_scores  # noqa: F401 - registers CLIPN's scores (ctw, atd) in SCORES
