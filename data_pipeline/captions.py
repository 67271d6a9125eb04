"""Where a video's caption comes from: a sidecar file beside it, else its container metadata.

Looked for in this order (the first non-empty one wins):
  1. `NAME.txt` beside `NAME.mp4`: the whole file, UTF-8, whitespace runs collapsed to one space;
  2. `NAME.json`: a JSON string, or an object with a string field `caption` (or `text`);
  3. container tags `description`, `comment`, `title` (in that order).
A video with none gets the empty caption, and its clips carry `caption_missing: true` in meta.
A sidecar that exists but cannot be read is reported (`caption_error` in the manifest) and the
search goes on, so a bad sidecar does not silently stand for "no caption".
Every clip of a video shares the video's caption.
"""

from __future__ import annotations

import json
import os

SIDECAR_EXTENSIONS = (".txt", ".json")
_TAG_KEYS = ("description", "comment", "title")


def sidecar_paths(video_path: str) -> list[str]:
  stem = os.path.splitext(video_path)[0]
  return [stem + ext for ext in SIDECAR_EXTENSIONS]


def is_sidecar(path: str, names_in_dir: set[str]) -> bool:
  """Whether `path` is a caption sidecar of another file in its directory (`names_in_dir`)."""
  stem, ext = os.path.splitext(os.path.basename(path))
  if ext.lower() not in SIDECAR_EXTENSIONS:
    return False
  return any(os.path.splitext(n)[0] == stem and os.path.splitext(n)[1].lower()
             not in SIDECAR_EXTENSIONS for n in names_in_dir)


def find_caption(video_path: str, tags: dict[str, str]) -> dict[str, object]:
  """{'caption', 'source' ('sidecar_txt'|'sidecar_json'|'tag:<key>'|'none'), 'errors'}."""
  errors = []
  stem = os.path.splitext(video_path)[0]
  txt, js = stem + ".txt", stem + ".json"
  if os.path.lexists(txt):
    try:
      with open(txt, encoding="utf-8") as f:
        caption = _clean(f.read())
      if caption:
        return {"caption": caption, "source": "sidecar_txt", "errors": errors}
    except (OSError, UnicodeDecodeError) as e:
      errors.append(f"{os.path.basename(txt)}: {type(e).__name__}: {e}")
  if os.path.lexists(js):
    try:
      with open(js, encoding="utf-8") as f:
        value = json.load(f)
      if isinstance(value, dict):
        value = value.get("caption", value.get("text"))
      if value is not None and not isinstance(value, str):
        raise ValueError(f"caption must be a string, got {type(value).__name__}")
      caption = _clean(value or "")
      if caption:
        return {"caption": caption, "source": "sidecar_json", "errors": errors}
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
      errors.append(f"{os.path.basename(js)}: {type(e).__name__}: {e}")
  for key in _TAG_KEYS:
    caption = _clean(tags.get(key, ""))
    if caption:
      return {"caption": caption, "source": f"tag:{key}", "errors": errors}
  return {"caption": "", "source": "none", "errors": errors}


def _clean(text: str) -> str:
  return " ".join(text.split())
