"""Post-processing: golden small case (threshold, per-class NMS, clipping, top-k) and torchvision agreement."""
import torch
from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads

from heads.detection.box_coder import BoxCoder
from heads.detection.postprocess import postprocess_detections

CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))


def _logits(rows):
    """Logits whose softmax equals ``rows`` (probabilities over background + K classes)."""
    return torch.tensor(rows).log()


def test_golden_two_images():
    props = torch.tensor([
        [10.0, 10.0, 50.0, 50.0],   # img 0, class 1, 0.8
        [12.0, 12.0, 52.0, 52.0],   # img 0, class 1, 0.7: IoU 0.82 with the first -> suppressed
        [12.0, 12.0, 52.0, 52.0],   # img 0, class 2, 0.6: other class -> kept
        [60.0, 60.0, 120.0, 90.0],  # img 1, class 1, 0.9; clipped to the 100 x 80 image
        [0.0, 0.0, 20.0, 20.0],     # img 1, all scores below 0.05
    ])
    logits = _logits([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.3, 0.1, 0.6], [0.06, 0.9, 0.04], [0.92, 0.04, 0.04]])
    dets = postprocess_detections(logits, torch.zeros(5, 12), props, torch.tensor([0, 0, 0, 1, 1]),
                                  torch.tensor([[100, 100], [80, 100]]), CODER)
    # the class-2 scores of RoIs 0 and 1 (0.1 each) overlap RoI 2's class 2 (0.6): suppressed too
    assert dets[0]["labels"].tolist() == [1, 2]
    torch.testing.assert_close(dets[0]["scores"], torch.tensor([0.8, 0.6]))
    torch.testing.assert_close(dets[0]["boxes"], props[[0, 2]])
    assert dets[1]["labels"].tolist() == [1]
    torch.testing.assert_close(dets[1]["boxes"], torch.tensor([[60.0, 60.0, 100.0, 80.0]]))
    top1 = postprocess_detections(logits, torch.zeros(5, 12), props, torch.tensor([0, 0, 0, 1, 1]),
                                  torch.tensor([[100, 100], [80, 100]]), CODER, detections_per_img=1)
    assert [len(d["boxes"]) for d in top1] == [1, 1] and top1[0]["scores"].item() == torch.tensor(0.8).item()


def test_matches_torchvision_postprocess():
    k, n = 4, 300
    props = torch.rand(n, 2) * 200
    props = torch.cat([props, props + 4 + torch.rand(n, 2) * 100], 1)
    logits, deltas = torch.randn(n, k + 1) * 2, torch.randn(n, 4 * (k + 1))
    sizes = [(240, 256), (200, 180)]
    img = torch.tensor([0] * 170 + [1] * 130)
    ours = postprocess_detections(logits, deltas, props, img, torch.tensor(sizes), CODER, detections_per_img=50)
    tv = TVRoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), 0.05, 0.5, 50)
    ref_boxes, ref_scores, ref_labels = tv.postprocess_detections(logits, deltas, [props[:170], props[170:]], sizes)
    for o, b, s, lab in zip(ours, ref_boxes, ref_scores, ref_labels):
        assert torch.equal(o["labels"], lab)
        torch.testing.assert_close(o["boxes"], b)
        torch.testing.assert_close(o["scores"], s)
