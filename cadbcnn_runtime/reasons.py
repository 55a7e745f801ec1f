"""Why an image needs review, in words: one home for the phrases the napari panel and the HTML review report show
(the confidence phrase stays with each, as only the panel knows the review threshold)."""

from __future__ import annotations


def review_reasons(label: str, *, blank: bool = False, ood: bool = False, ood_score: float | None = None,
                   atypical: bool = False, appearance_score: float | None = None, low_score: bool = False,
                   review_score: float | None = None) -> list[str]:
    """The flags that hold, most severe first: blank field, out of distribution, appearance unlike the training
    images of LABEL, learned review score below LABEL's threshold. A score that is not known is left out."""
    out = []
    if blank:
        out.append("blank or near-uniform field")
    if ood:
        out.append("out of distribution" + (f" (score {ood_score:.3f})" if ood_score is not None else ""))
    if atypical:
        out.append(f"colour and contrast unlike the training images of {label}"
                   + (f" (score {appearance_score:.2f})" if appearance_score is not None else ""))
    if low_score:
        out.append("learned review score" + (f" {review_score:.3f}" if review_score is not None else "")
                   + f" below the threshold of {label}")
    return out
