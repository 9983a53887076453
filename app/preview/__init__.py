"""Browser preview of a live run (``python -m app.live --serve 8080``) for PCs with no monitor.

:class:`PreviewServer` (:mod:`app.preview.server`) binds the address before the model loads and serves
one page (``static/``), an MJPEG stream of the overlay, live statistics as JSON and a record button;
:class:`PreviewSink` (:mod:`app.preview.sink`) is its end of the pipeline, in the sinks stage. Loopback
only unless ``preview.public`` (``--serve-public``) is set.
"""

from app.preview.server import PreviewError, PreviewServer, is_loopback, parse_address
from app.preview.sink import PreviewSink

__all__ = ["PreviewError", "PreviewServer", "PreviewSink", "is_loopback", "parse_address"]
