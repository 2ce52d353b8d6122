"""The same blind items for established annotation tools: a Label Studio project (tasks + labeling config)
and an Amazon Mechanical Turk batch (input CSV + HIT layout). Images travel inline as PNG data URIs."""

from __future__ import annotations

import csv
import html
import io
import json

from distillery.preference.images import png_data_uri
from distillery.preference.study import Study

# the Label Studio Choices values, and the answer each stands for
LABEL_STUDIO_CHOICES = {"Left": "left", "Tie": "tie", "Right": "right"}
MTURK_COLUMNS = ("study", "item", "left", "right", "prompt")


def label_studio_tasks(study: Study) -> str:
    """A task list to import into a Label Studio project (one task per item, in the study's order)."""
    tasks = [
        {
            "data": {
                "study": study.study_id,
                "item": i.id,
                "left": png_data_uri(i.left),
                "right": png_data_uri(i.right),
                "prompt": i.prompt,
            }
        }
        for i in study.items
    ]
    return json.dumps(tasks, indent=1, sort_keys=True) + "\n"


def label_studio_config(question: str, image_px: int) -> str:
    """The labeling config: both images side by side, unsmoothed, and one required Left / Tie / Right choice."""
    choices = "\n".join(
        f'    <Choice value="{value}" hotkey="{n}"/>' for n, value in enumerate(LABEL_STUDIO_CHOICES, 1)
    )
    size = f'width="{image_px}px" maxWidth="{image_px}px"'
    return (
        f'<View>\n  <Header value="{html.escape(question, quote=True)}"/>\n'
        f'  <Text name="prompt" value="$prompt"/>\n'
        f'  <View style="display: flex; gap: 2em;">\n'
        f'    <Image name="left" value="$left" smoothing="false" {size}/>\n'
        f'    <Image name="right" value="$right" smoothing="false" {size}/>\n  </View>\n'
        f'  <Choices name="choice" toName="left" choice="single-radio" showInline="true" required="true">\n'
        f"{choices}\n  </Choices>\n</View>\n"
    )


def mturk_batch(study: Study) -> str:
    """The input CSV of an MTurk batch, one HIT per item. MTurk pastes values into the layout verbatim,
    so the prompt is HTML-escaped here."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(MTURK_COLUMNS)
    for i in study.items:
        writer.writerow([study.study_id, i.id, png_data_uri(i.left), png_data_uri(i.right), html.escape(i.prompt)])
    return out.getvalue()


def mturk_layout(question: str, image_px: int) -> str:
    """The HIT layout for the batch (MTurk "Custom" project); its ${…} variables are the batch's columns and its
    answer comes back as the results column Answer.choice (left, right or tie)."""
    # `$` is escaped too: MTurk would read "${" in the question as a variable
    text = html.escape(question).replace("$", "&#36;")
    img = f'width="{image_px}" height="{image_px}" style="image-rendering: pixelated; background: #000;"'
    return f"""<script src="https://assets.crowd.aws/crowd-html-elements.js"></script>
<crowd-form answer-format="flatten-objects">
  <h3>{text}</h3>
  <p>${{prompt}}</p>
  <div style="display: flex; gap: 2em; align-items: flex-end;">
    <label style="text-align: center;"><img src="${{left}}" alt="left image" {img}><br>
      <input type="radio" name="choice" value="left" required> Left</label>
    <label style="text-align: center;"><img src="${{right}}" alt="right image" {img}><br>
      <input type="radio" name="choice" value="right"> Right</label>
  </div>
  <p><label><input type="radio" name="choice" value="tie"> Tie: equally good, or I cannot tell them apart</label></p>
</crowd-form>
"""
