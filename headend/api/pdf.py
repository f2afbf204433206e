"""A receipt as a one-page PDF (reportlab), line for line the text receipt."""

from __future__ import annotations

import io
from typing import Any

from reportlab.lib.pagesizes import A6
from reportlab.pdfgen.canvas import Canvas

from headend.domain.pricing import receipt_text


def receipt_pdf(
    payment: dict[str, Any], state: str = "accepted", *, reprint: bool = False
) -> bytes:
    """The PDF of a payment's receipt, from its stored answer (the same lines as
    :func:`~headend.domain.pricing.receipt_text`)."""
    buffer = io.BytesIO()
    width, height = A6
    canvas = Canvas(buffer, pagesize=A6, invariant=True, pageCompression=0)
    canvas.setTitle(f"Receipt {int(payment['receipt']):08d}")
    canvas.setAuthor("prepaid-hes")
    text = canvas.beginText(24, height - 32)
    text.setFont("Courier", 7.5, leading=10)
    for line in receipt_text(payment, state, reprint=reprint).splitlines():
        text.textLine(line)
    canvas.drawText(text)
    canvas.line(24, 20, width - 24, 20)
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()
