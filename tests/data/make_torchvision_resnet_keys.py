"""Regenerates torchvision_resnet_keys.json from torchvision's own resnet.py (run by hand, not by tests).

torchvision does not import beside every torch build, so its ``models/resnet.py`` is executed on its
own, with stubs for the weight-registry helpers it imports (they do not touch the module structure):

    pip download --no-deps torchvision -d /tmp/tv && unzip -o /tmp/tv/torchvision-*.whl \
        torchvision/models/resnet.py -d /tmp/tv/ext
    python tests/data/make_torchvision_resnet_keys.py /tmp/tv/ext/torchvision/models/resnet.py <version>
"""

import enum
import json
import sys
import types
from pathlib import Path

source_path, version = Path(sys.argv[1]), sys.argv[2]
source = source_path.read_text()
stubs = '''
class ImageClassification:
    def __init__(self, *a, **k): pass
def _log_api_usage_once(*a, **k): pass
def register_model(*a, **k): return lambda f: f
class Weights:
    def __init__(self, url, transforms, meta): self.url, self.transforms, self.meta = url, transforms, meta
class WeightsEnum(enum.Enum):
    @classmethod
    def verify(cls, w): return w
_IMAGENET_CATEGORIES = []
def _ovewrite_named_param(*a, **k): pass
def handle_legacy_interface(**k): return lambda f: f
'''
lines = [l for l in source.splitlines() if not l.startswith("from .")]
module = types.ModuleType("tv_resnet")
exec("import enum\n" + stubs + "\n".join(lines), module.__dict__)
out = {"_source": f"torchvision {version} torchvision/models/resnet.py, executed by {Path(__file__).name}"}
for name in ("resnet18", "resnet50"):
    model = getattr(module, name)(weights=None)
    out[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
dest = Path(__file__).with_name("torchvision_resnet_keys.json")
body = ",\n".join(
    f" {json.dumps(name)}: " + ("{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items()) + "\n }"
                               if isinstance(keys, dict) else json.dumps(keys))
    for name, keys in out.items()
)
dest.write_text("{\n" + body + "\n}\n")
print(f"{dest}: resnet18 {len(out['resnet18'])} keys, resnet50 {len(out['resnet50'])} keys")
