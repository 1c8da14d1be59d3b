import numpy as np
import pytest

from mre.judging import prompts


@pytest.mark.parametrize("form", prompts.FORMS)
@pytest.mark.parametrize("perspective", prompts.PERSPECTIVES)
def test_prompt_identifies_itself(form, perspective):
  text = prompts.prompt_text(form, perspective, "turn the red circle   blue")
  marker = (
      f"Judge prompt {prompts.PROMPT_VERSION}: {form} / {prompts.PERSPECTIVE_NAMES[perspective]}"
  )
  assert text.splitlines()[0] == marker
  got_form, got_perspective, instruction = prompts.identify(text)
  assert (got_form, got_perspective) == (form, perspective)
  assert instruction == (None if perspective == "quality" else "turn the red circle blue")
  key = prompts.EVALUATION_KEYS[perspective]
  assert (f"'{key}': 'yes' or 'no'" in text) == (form == "evaluation")


def test_messages_carry_the_images_in_order():
  original = np.zeros((8, 8, 3), np.uint8)
  edited = np.full((8, 8, 3), 255, np.uint8)
  messages = prompts.build_messages(
      "annotation", "following", "remove the red square", original, edited
  )
  assert [m["role"] for m in messages] == ["system", "user"]
  parts = messages[1]["content"]
  assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
  assert parts[1]["image_url"]["url"] == prompts.image_data_url(original)
  assert prompts.data_url_bytes(parts[2]["image_url"]["url"]).startswith(b"\x89PNG")
  quality = prompts.build_messages("evaluation", "quality", None, original, edited)[1]["content"]
  assert [p["type"] for p in quality] == ["text", "image_url"]
  assert quality[1]["image_url"]["url"] == prompts.image_data_url(edited)


def test_replies_round_trip_and_tolerate_wrapping():
  text = prompts.format_annotation_reply(3.46, "the circle is orange, not blue")
  assert prompts.parse_annotation_reply(text) == prompts.Annotation(
      3.5, "the circle is orange, not blue"
  )
  fenced = '```json\n{"score": 4, "failure": "no negative aspects"}\n```'
  assert prompts.parse_annotation_reply(fenced) == prompts.Annotation(4.0, "no negative aspects")
  for perspective in prompts.PERSPECTIVES:
    text = prompts.format_evaluation_reply(perspective, True, 4.5)
    assert text == repr({prompts.EVALUATION_KEYS[perspective]: "yes", "score": 4.5})
    assert prompts.parse_evaluation_reply(perspective, "Sure! " + text) == prompts.Evaluation(
        True, 4.5
    )
  assert prompts.parse_evaluation_reply(
      "preserving", "{'consistent': 'No', 'score': 2}"
  ) == prompts.Evaluation(False, 2.0)


@pytest.mark.parametrize(
    "reply, message",
    [
        ("I'm sorry, I can't help.", "holds no"),
        ('{"score": "high", "failure"', "holds no"),
        ('{"score": 7, "failure": "x"}', "outside 0..5"),
        ('{"score": 3}', "no failure text"),
    ],
)
def test_malformed_annotation_replies_are_rejected(reply, message):
  with pytest.raises(ValueError, match=message):
    prompts.parse_annotation_reply(reply)


def test_bad_prompt_inputs():
  with pytest.raises(ValueError, match="needs the editing instruction"):
    prompts.prompt_text("annotation", "following", "")
  with pytest.raises(ValueError, match="unknown perspective"):
    prompts.prompt_text("annotation", "beauty", "x")
  with pytest.raises(ValueError, match="marker line"):
    prompts.identify("How good is this edit?")
  with pytest.raises(ValueError, match="base64 data URL"):
    prompts.data_url_bytes("https://example.com/a.png")
  with pytest.raises(ValueError, match="uint8"):
    prompts.image_data_url(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="no 'following': 'yes'"):
    prompts.parse_evaluation_reply("following", "{'clear': 'yes', 'score': 5}")


@pytest.mark.parametrize(
    "score",
    [
        "true",
        "false",
        '"3"',
        '"high"',
        "null",
        "NaN",
        "Infinity",
        "-1",
        "5.01",
        "1e400",
        pytest.param("9" * 400, id="a 400-digit int"),
        "[3]",
        '{"value": 3}',
    ],
)
def test_a_score_is_a_json_number_from_0_to_5(score):
  with pytest.raises(ValueError, match="score"):
    prompts.parse_annotation_reply(f'{{"score": {score}, "failure": "no negative aspects"}}')
  python = {"true": "True", "false": "False", "null": "None"}.get(score, score)
  with pytest.raises(ValueError):
    prompts.parse_evaluation_reply("quality", f"{{'clear': 'yes', 'score': {python}}}")


def test_whole_and_boundary_scores_are_numbers():
  assert prompts.parse_annotation_reply('{"score": 0, "failure": "x"}') == prompts.Annotation(
      0.0, "x"
  )
  assert prompts.parse_annotation_reply('{"score": 5, "failure": "x"}').score == 5.0
  assert prompts.parse_evaluation_reply(
      "following", "{'following': 'yes', 'score': 3}"
  ) == prompts.Evaluation(True, 3.0)


@pytest.mark.parametrize(
    "reply",
    [
        '{"score": ' + "[" * 5000 + "]" * 5000 + ', "failure": "x"}',  # past json's recursion limit
        "{'score': "
        + "(" * 300
        + ")" * 300
        + ", 'failure': 'x'}",  # past the Python parser's nesting limit
        "{" * 9000 + "}" * 9000,
        '{"score": 3, "failure": '
        + "[" * 900
        + "]" * 900
        + "}",  # decodes, but the failure is no text
        "{[1]: 2}",  # literal_eval: unhashable key
        "{'score': 1+2j, 'failure': 'x'}",
        '{"score": 3, "failure": "x"}' + " " * prompts.MAX_REPLY_CHARS,
        "{\x00}",
        '{"score": 3, "failure": "\ud800"}',
    ],
)
def test_any_reply_is_at_worst_malformed(reply):
  for parse in (
      prompts.parse_annotation_reply,
      lambda text: prompts.parse_evaluation_reply("following", text),
  ):
    with pytest.raises(ValueError):
      parse(reply)
