import pytest

import keras_gemma


def test_format_chat_turns_and_generation_prompt():
    text = keras_gemma.format_chat([
        {"role": "user", "content": "Hi"},
        {"role": "model", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
    ])
    assert text == (
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a color.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma3_system_turn_joins_the_first_user_turn():
    text = keras_gemma.format_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=False,
    )
    assert text == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"


def test_turn_content_is_trimmed_as_gemmas_templates_do():
    # `message['content'] | trim` in Gemma 1/2/3's templates; the system
    # text goes before the trimmed first user turn as it is.
    text = keras_gemma.format_chat([
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": "  Hi\n"},
        {"role": "model", "content": "Hello! \n\n"},
    ])
    assert text == (
        "<start_of_turn>user\nBe brief. \n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_assistant_turns_are_model_turns():
    """OpenAI-style messages, as transformers' Gemma templates take them."""
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
    assert keras_gemma.format_chat([user, answer]) == keras_gemma.format_chat(
        [user, {"role": "model", "content": "Hello!"}]
    )
    assert "<start_of_turn>model\nHello!<end_of_turn>" in keras_gemma.format_chat([user, answer])


@pytest.mark.parametrize(
    "turns, kwargs, message",
    [
        ([{"role": "bot", "content": "x"}], {}, "role in"),
        (["Hi"], {}, "role in"),
        ("Hi", {}, "takes a list of turns"),
        ([], {}, "got no turns"),  # Was the bare generation prompt.
        ({"role": "user", "content": "Hi"}, {}, "takes a list of turns"),
        ([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
         {"allow_system": False}, "no system role"),
        ([{"role": "system", "content": "x"}], {}, "followed by a user turn"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], {}, "Only the first turn"),
        # Formatted silently; transformers' templates refuse these orders.
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], {}, "turn 1 is a user turn"),
        ([{"role": "model", "content": "x"}, {"role": "user", "content": "y"}], {}, "turn 0 is a model turn"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "x"},
          {"role": "model", "content": "y"}, {"role": "model", "content": "z"}], {}, "turn 3 is a model turn"),
    ],
)
def test_bad_turns_are_clear_errors(turns, kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_gemma.format_chat(turns, **kwargs)
