// Build the npm package's files from the one source, fastws/client/fastws.js
// (the file the fastws server serves at /fastws.js):
//
//   node build.mjs [OUTDIR]        (default: this directory)
//
// writes OUTDIR/fastws.js (the ES module, copied as it is) and
// OUTDIR/fastws.global.js (a plain script defining globalThis.fastws: the
// module's one `export { ... };` line becomes the global's fields; the same
// transform as fastws.roomproto.global_script, which serves /fastws.global.js).
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const source = resolve(here, "..", "..", "fastws", "client", "fastws.js");
const out = resolve(process.argv[2] || here);

export function globalScript(moduleSource) {
  const lines = moduleSource.split("\n");
  const exports = lines.map((l, i) => (l.startsWith("export {") ? i : -1)).filter((i) => i >= 0);
  if (exports.length !== 1) throw new Error("fastws.js must end with one 'export { ... };' line");
  const names = lines[exports[0]].slice("export {".length).split("}")[0];
  lines.splice(exports[0], 1);
  const body = lines.join("\n").replace(/\n+$/, "");
  return "(function () {\n" + body + "\nglobalThis.fastws = {" + names + "};\n})();\n";
}

const text = readFileSync(source, "utf8");
mkdirSync(out, { recursive: true });
writeFileSync(join(out, "fastws.js"), text);
writeFileSync(join(out, "fastws.global.js"), globalScript(text));
if (out !== here) writeFileSync(join(out, "package.json"), JSON.stringify({ type: "module" }) + "\n");
console.log("wrote " + join(out, "fastws.js") + " and fastws.global.js");
