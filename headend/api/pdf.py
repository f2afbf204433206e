"""Receipts and bills as PDF (reportlab), line for line their text."""

from __future__ import annotations

import io
from typing import Any

from reportlab.lib.pagesizes import A4, A6
from reportlab.pdfgen.canvas import Canvas

from headend.domain.billing import bill_text
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


def bill_pdf(document: dict[str, Any]) -> bytes:
    """The PDF of a monthly bill or e-invoice (A4, as many pages as its lines take), line for
    line :func:`~headend.domain.billing.bill_text`."""
    buffer = io.BytesIO()
    height = A4[1]
    canvas = Canvas(buffer, pagesize=A4, invariant=True, pageCompression=0)
    title = "E-invoice" if document["kind"] == "e-invoice" else "Bill"
    canvas.setTitle(
        f"{title} {int(document['number']):08d} {document['account']} {document['month']}"
    )
    canvas.setAuthor("prepaid-hes")
    lines = bill_text(document).splitlines()
    per_page = int((height - 80) // 12)
    for first in range(0, len(lines), per_page):
        text = canvas.beginText(40, height - 48)
        text.setFont("Courier", 9, leading=12)
        for line in lines[first : first + per_page]:
            text.textLine(line)
        canvas.drawText(text)
        canvas.showPage()
    canvas.save()
    return buffer.getvalue()
