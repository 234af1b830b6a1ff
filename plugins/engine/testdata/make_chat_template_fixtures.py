"""Chat-template renderings by transformers (apply_chat_template) for a model directory: a tool
list, a conversation with a tool call and a tool response, and a plain multi-turn chat. Used by
the qwen3-coder-30b and glm-4-7 fixtures:

    python3 make_chat_template_fixtures.py MODEL_DIR OUT.json
"""
import json, sys, os
from transformers import AutoTokenizer
tok_dir, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(tok_dir)
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                          "days": {"type": "integer"}, "metric": {"type": "boolean"},
                                                          "hours": {"type": "array", "items": {"type": "integer"}}},
                         "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": {"type": "object", "properties": {}}}}]
convs = [
  ([{"role": "user", "content": "What is the weather in Paris?"}], tools),
  ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris for 3 days?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": True}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "It is 21 degrees."},
    {"role": "user", "content": "And the time?"}], tools),
  ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}], None),
]
renders = []
for messages, t in convs:
    text = tok.apply_chat_template(messages, tools=t, tokenize=False, add_generation_prompt=True)
    renders.append({"messages": messages, "tools": t, "text": text})
json.dump({"source": "transformers apply_chat_template", "renders": renders}, open(out, "w"), indent=1, ensure_ascii=False)
print(renders[1]["text"][-600:])
