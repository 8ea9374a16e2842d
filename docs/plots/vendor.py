"""Write docs/plots/offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

`dvc plots show` loads these three libraries from a CDN, so its page is blank offline.
`.dvc/config` points DVC at this template instead (`plots.html_template`), which carries them
inline: the page DVC writes (dvc_plots/index.html) renders with no network, and can be copied
or attached anywhere as one file.

The template is committed, so rendering plots and CI need neither npm nor the network. To move
to other versions, change PACKAGES (the versions and the registry's sha512 `integrity`, shown by
`npm view <name>@<version> dist.integrity`) and run `make plots-template` (needs npm and the npm
registry): it downloads the packages with `npm pack`, checks them and rewrites the template and
the licenses beside it.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "offline.html"

# name, version, the UMD bundle inside the package, the npm registry's integrity of the tarball
PACKAGES = (
    (
        "vega",
        "6.4.0",
        "build/vega.min.js",
        "sha512-rHXCq2LpEWCLMjXBEj7hocY9G0/i5TGYRayGGSj06VTF4+l2IG2Z7oeZKCjWbUh/7hTE/mVhbaOPB72wCElh6g==",
    ),
    (
        "vega-lite",
        "6.5.0",
        "build/vega-lite.min.js",
        "sha512-fMXF6s0MrIg0UTWnLIfeFtgSLzVhyzSKobzGrh5rhS+mL6FOYFG3m7ouJ4U23gj65EK+gl9FIIT5w7wLNaAzkA==",
    ),
    (
        "vega-embed",
        "7.3.0",
        "build/vega-embed.min.js",
        "sha512-wQ8s5GaSzqoKgmRfbRolgBrjE2CP7ZKHXqH7NijxMqPjpdWxSs4Dn8tvp9g0giQvh2cK+3p56sxjWWM0wNngGw==",
    ),
)

# DVC fills these in (dvc_render.html.HTML); `{scripts}` is left out: it would add the CDN tags.
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

# After vega-embed: charts as SVG (sharp at any zoom, text selectable), no "Open in Vega Editor"
# (it needs the network), and every chart's view in `window.plots` (e.g. in the browser console:
# `plots[0].data("source_0")`; the tests read the rendered series the same way).
SETUP = """\
(function () {
  var embed = window.vegaEmbed;
  window.plots = [];
  window.vegaEmbed = function (element, spec, options) {
    var settings = Object.assign(
      {renderer: "svg", actions: {export: true, source: true, compiled: true, editor: false}},
      options
    );
    return embed(element, spec, settings).then(function (result) {
      window.plots.push(result.view);
      return result;
    });
  };
})();
"""

PAGE = """\
<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>imgtocap: DVC plots</title>
<!-- Written by docs/plots/vendor.py (`make plots-template`): DVC's plots page with vega,
     vega-lite and vega-embed inlined, so that `dvc plots show` renders with no network. -->
@SCRIPTS@
<style>
  body { font-family: sans-serif; margin: 16px; }
  table { border-spacing: 15px; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def integrity(data: bytes) -> str:
    """npm's `integrity` of a tarball: sha512, base64."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch(name: str, version: str, tmp: Path) -> Path:
    """`npm pack name@version` into tmp; returns the tarball."""
    subprocess.run(
        ["npm", "pack", "--loglevel=warn", f"{name}@{version}", "--pack-destination", str(tmp)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (tarball,) = tmp.glob(f"{name}-{version}.tgz")
    return tarball


def script_block(name: str, version: str, bundle: str, code: str) -> str:
    """One inline <script>, preceded by where it came from."""
    if "</script" in code.lower():  # would end the inline script early
        code = code.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    for placeholder in PLACEHOLDERS:
        if placeholder in code:
            raise SystemExit(f"{name} {bundle} contains DVC's placeholder {placeholder}")
    sha256 = hashlib.sha256(code.encode()).hexdigest()
    return (
        f"<!-- {name} {version} ({bundle}, sha256 {sha256}); BSD-3-Clause, "
        f"docs/plots/LICENSE.{name} -->\n<script>\n{code}\n</script>"
    )


def main() -> None:
    """Download, check, and write offline.html and the three LICENSE files."""
    blocks = []
    with tempfile.TemporaryDirectory(prefix="imgtocap-npm-") as tmp:
        for name, version, bundle, expected in PACKAGES:
            tarball = fetch(name, version, Path(tmp))
            got = integrity(tarball.read_bytes())
            if got != expected:
                raise SystemExit(f"{tarball.name}: integrity {got}, expected {expected}")
            with tarfile.open(tarball) as tar:
                code = tar.extractfile(f"package/{bundle}").read().decode("utf-8")
                license_text = tar.extractfile("package/LICENSE").read()
            (HERE / f"LICENSE.{name}").write_bytes(license_text)
            blocks.append(script_block(name, version, bundle, code.rstrip("\n")))
    blocks.append(f"<script>\n{SETUP}</script>")
    TEMPLATE.write_text(PAGE.replace("@SCRIPTS@", "\n".join(blocks)), encoding="utf-8")
    print(f"wrote {TEMPLATE} ({TEMPLATE.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
