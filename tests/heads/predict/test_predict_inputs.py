"""heads/predictor.py: decoding every input kind, EXIF, sources, videos and broken files (no model)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from heads.predictor import Item, SourceError, decode_image, expand_sources, video_frames
from res_backbone.data.images import ImageDecodeError


def _rgb(h=20, w=30):
    a = np.zeros((h, w, 3), np.uint8)
    a[:5, :10] = (255, 0, 0)  # a red block top-left
    return a


def test_decode_every_input_kind(tmp_path):
    a = _rgb()
    p = tmp_path / "a.png"
    Image.fromarray(a).save(p)
    for x in (p, str(p), Image.fromarray(a), a, torch.from_numpy(a).permute(2, 0, 1),
              torch.from_numpy(a).permute(2, 0, 1).float() / 255):
        out = decode_image(x)
        assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
        np.testing.assert_array_equal(out, a)
    with pytest.raises(ValueError, match="uint8"):
        decode_image(a.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        decode_image(torch.zeros(4, 5, 5))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "CMYK"])
def test_grey_palette_alpha_16bit_cmyk_become_rgb(tmp_path, mode):
    im = Image.fromarray(_rgb()).convert(mode) if mode != "I;16" else Image.new("I;16", (30, 20), 65535)
    p = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    im.save(p)
    out = decode_image(p)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out.max() == 255


def test_exif_orientation_is_honoured_unless_off(tmp_path):
    a = _rgb(20, 30)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "phone.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    assert decode_image(p).shape == (30, 20, 3)  # upright: portrait
    assert decode_image(p, exif=False).shape == (20, 30, 3)  # COCO files: the stored pixels


def test_broken_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(0).integers(0, 255, 500, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for p in (empty, noise, truncated):
        with pytest.raises(ImageDecodeError, match=p.name):
            decode_image(p)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        decode_image(tmp_path / "gone.png")


def test_sources_folders_globs_lists(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.jpg", "sub/c.png", "notes.md"):
        (tmp_path / name).write_bytes(b"x")
    assert [Item(str(tmp_path / n)).path for n in ("a.jpg", "b.png")] == \
        [it.path for it in expand_sources([tmp_path])]
    assert len(expand_sources([tmp_path], recursive=True)) == 3
    assert [it.path for it in expand_sources([str(tmp_path / "*.png")])] == [str(tmp_path / "b.png")]
    lst = tmp_path / "list.txt"
    lst.write_text("# my files\nb.png\n\nsub/c.png\n")
    assert [it.path for it in expand_sources([lst])] == [str(tmp_path / "b.png"), str(tmp_path / "sub/c.png")]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "deeper").mkdir()
    (tmp_path / "none" / "deeper" / "x.png").write_bytes(b"x")
    with pytest.raises(SourceError, match=r"none: no image or video files.*--recursive"):
        expand_sources([tmp_path / "none"])
    with pytest.raises(SourceError, match="missing.png: no such file"):
        expand_sources([tmp_path / "missing.png"])
    with pytest.raises(SourceError, match="matches no files"):
        expand_sources([str(tmp_path / "*.gif")])


def test_video_frames_with_stride_and_an_undecodable_video(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(7):
        writer.write(np.full((24, 32, 3), i * 30, np.uint8))
    writer.release()
    items = expand_sources([path])
    assert items[0].video
    frames = list(video_frames(str(path), stride=3))
    assert [i for i, _ in frames] == [0, 3, 6] and frames[0][1].shape == (24, 32, 3)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(ImageDecodeError, match="broken.mp4"):
        list(video_frames(str(bad)))
