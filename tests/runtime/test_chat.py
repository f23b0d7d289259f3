"""Chat templates render exactly like transformers' apply_chat_template."""

import json

import pytest
from smolexport_runtime import ChatTemplate, ChatTemplateError, Model
from smolexport_runtime.chat import load_chat_template
from tokenizers import processors

from .conftest import SMOLLM2_TEMPLATE, make_tokenizer, random_decoder

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_smollm2_template_adds_the_default_system_prompt():
    text = ChatTemplate(SMOLLM2_TEMPLATE).render([{"role": "user", "content": "Hi"}])
    assert text == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_template_with_system_and_history_no_generation_prompt():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = ChatTemplate(SMOLLM2_TEMPLATE).render(messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_transformers_environment_features():
    source = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}{{ eos_token }}|{{ strftime_now('%Y') | length }}"
    )
    template = ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"})
    text = template.render([{"role": "user", "content": "a<b>&é"}, {"role": "user", "content": "x"}])
    # tojson keeps <, > and & and non-ASCII as they are (jinja's built-in would escape them).
    assert text == '<s>{"role": "user", "content": "a<b>&é"}</s>|4'


def test_trim_and_lstrip_blocks():
    # trim_blocks eats the newline after a block tag, lstrip_blocks the indentation before one.
    source = "{% for m in messages %}\n  {% if m %}\n{{ m['content'] }}\n  {% endif %}\n{% endfor %}"
    assert ChatTemplate(source).render([{"role": "user", "content": "x"}]) == "x\n"


def test_raise_exception_becomes_a_clear_error():
    source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="first message must be user"):
        ChatTemplate(source).render([{"role": "assistant", "content": "x"}])


def test_bad_template_and_bad_messages():
    with pytest.raises(ChatTemplateError, match="not a valid Jinja template"):
        ChatTemplate("{% for %}").render([])
    with pytest.raises(ChatTemplateError, match="role"):
        ChatTemplate(SMOLLM2_TEMPLATE).render([{"content": "no role"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate(SMOLLM2_TEMPLATE).render("just a string")


def test_template_file_wins_over_tokenizer_config(tmp_path):
    config = {"chat_template": "from config", "eos_token": {"content": "<|im_end|>"}, "bos_token": None}
    assert load_chat_template(tmp_path, config).source == "from config"
    assert load_chat_template(tmp_path, config).special_tokens == {"eos_token": "<|im_end|>"}
    (tmp_path / "chat_template.jinja").write_text("from file")
    assert load_chat_template(tmp_path, config).source == "from file"


def test_named_templates_and_missing_template(tmp_path):
    named = {"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]}
    assert load_chat_template(tmp_path, named).source == "d"
    assert load_chat_template(tmp_path, json.loads("{}")) is None


def test_model_without_template(tokenizer):
    model = Model(random_decoder(), tokenizer, context_length=64)
    assert model.encode("hi") == [ord("h"), ord("i")]  # no template: a str is raw text
    with pytest.raises(ChatTemplateError, match="no chat template"):
        model.stream([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        model.stream("hi", chat=True)


def test_chat_prompt_is_tokenized_without_extra_special_tokens():
    tokenizer = make_tokenizer()
    # A tokenizer that prepends <|endoftext|> as BOS, as Llama tokenizers do.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 256)]
    )
    model = Model(random_decoder(), tokenizer, chat_template=ChatTemplate(SMOLLM2_TEMPLATE))
    chat_ids = model.encode("Hi")
    assert chat_ids[0] == 257  # <|im_start|>, not a doubled BOS
    assert tokenizer.decode(chat_ids, skip_special_tokens=False) == model.apply_chat_template(
        [{"role": "user", "content": "Hi"}]
    )
    assert model.encode("Hi", chat=False)[0] == 256  # raw text gets the tokenizer's own specials
    with pytest.raises(ChatTemplateError, match="chat=True"):
        model.encode([{"role": "user", "content": "Hi"}], chat=False)
