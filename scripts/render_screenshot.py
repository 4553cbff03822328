"""Render the Extensions Index screenshot offscreen: the module's conversation panel answering the golden CT phantom
with the embedded demo model, beside the slice it answered with the suggested segment over it.

    . .venv/bin/activate && QT_QPA_PLATFORM=offscreen PYTHONPATH=Testing/support python scripts/render_screenshot.py

Writes Resources/Screenshots/MedSIGHT-conversation.png (named in the top CMakeLists.txt's EXTENSION_SCREENSHOTURLS).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSIGHTSlicer"))
GOLDEN = REPO / "MedSIGHTSlicer" / "Testing" / "Python" / "golden"
OUT = REPO / "Resources" / "Screenshots" / "MedSIGHT-conversation.png"


def main() -> None:
    import medsight
    import medsight.server.app
    from medsight.imaging import read_volume, to_rgb
    from medsight_testing.live_server import live_server
    from MedSIGHTSlicerLib.chat_panel import ChatPanel, VolumeData
    from MedSIGHTSlicerLib.client import MedSIGHTClient
    from MedSIGHTSlicerLib.qt_shim import qt

    app = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    case = json.loads((GOLDEN / "golden.json").read_text())
    volume = read_volume(str(GOLDEN / case["volume_file"]))
    data = VolumeData(volume.array, tuple(volume.spacing), tuple(volume.origin), tuple(np.ravel(volume.direction)),
                      case["modality"], key="phantom")
    engine = medsight.Engine.load("demo", device="cpu")
    with live_server(medsight.server.app.create_app(engine)) as url:
        panel = ChatPanel(MedSIGHTClient(url, timeout=120))
        panel.volume_provider = lambda: data
        panel.current_slice_provider = lambda: case["slice"]
        panel.options = dict(case["options"])
        answers = []
        panel.on_region_answers = answers.extend
        panel.widget.resize(460, 560)
        panel.widget.show()
        panel.question.setPlainText(case["question"])
        panel.send()
        deadline = time.monotonic() + 300
        while panel.busy and time.monotonic() < deadline:
            app.processEvents()
            time.sleep(0.01)
        app.processEvents()
        panel_image = panel.widget.grab().toImage()

    # The answered slice with the suggested segment over it, as the slice view shows it.
    pixels = to_rgb(volume.array[case["slice"]], case["modality"]).astype(np.float32)
    for answer in answers:
        for region in answer.regions:
            pixels[region.mask] = 0.55 * pixels[region.mask] + 0.45 * np.array([230, 77, 61])
    rgb = np.ascontiguousarray(pixels.astype(np.uint8))
    height, width = rgb.shape[:2]
    image = qt.QImage(rgb.data, width, height, 3 * width, qt.QImage.Format_RGB888).scaled(
        560, 560, qt.Qt.KeepAspectRatio, qt.Qt.SmoothTransformation)
    canvas = qt.QImage(image.width() + panel_image.width() + 24, max(image.height(), panel_image.height()) + 16,
                       qt.QImage.Format_RGB32)
    canvas.fill(qt.QColor("#2b2b2b"))
    painter = qt.QPainter(canvas)
    painter.drawImage(8, 8, image)
    painter.drawImage(image.width() + 16, 8, panel_image)
    painter.end()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if not canvas.save(str(OUT), "PNG"):
        raise SystemExit(f"could not write {OUT}")
    panel.close()
    print(f"{OUT} ({OUT.stat().st_size // 1024} KB, {canvas.width()}x{canvas.height()})")


if __name__ == "__main__":
    main()
