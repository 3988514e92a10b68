// Compile the contracts with the npm `solc` package (standard JSON, no downloads).
// Usage: node compile.js <node_modules dir> <src dir>  -> JSON {name: {abi, bytecode, deployedBytecode}} on stdout.
"use strict";
const fs = require("fs");
const path = require("path");

const [nodeModules, srcDir] = process.argv.slice(2);
if (!nodeModules || !srcDir) {
  process.stderr.write("usage: node compile.js <node_modules> <src>\n");
  process.exit(2);
}
const solc = require(path.join(nodeModules, "solc"));

const sources = {};
for (const name of fs.readdirSync(srcDir).sort()) {
  if (name.endsWith(".sol")) {
    sources[name] = { content: fs.readFileSync(path.join(srcDir, name), "utf8") };
  }
}
const input = {
  language: "Solidity",
  sources,
  settings: {
    optimizer: { enabled: true, runs: 10000 },
    evmVersion: "cancun",
    metadata: { bytecodeHash: "none", appendCBOR: false },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};
function findImports(importPath) {
  const full = path.join(nodeModules, importPath);
  if (fs.existsSync(full)) return { contents: fs.readFileSync(full, "utf8") };
  return { error: `not found: ${importPath}` };
}
const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
const errors = (output.errors || []).filter((e) => e.severity === "error");
for (const e of output.errors || []) process.stderr.write(e.formattedMessage + "\n");
if (errors.length) process.exit(1);
const result = { compiler: solc.version(), settings: input.settings, contracts: {} };
for (const file of Object.keys(sources)) {
  for (const [name, c] of Object.entries(output.contracts[file] || {})) {
    result.contracts[name] = {
      abi: c.abi,
      bytecode: "0x" + c.evm.bytecode.object,
      deployedBytecode: "0x" + c.evm.deployedBytecode.object,
    };
  }
}
process.stdout.write(JSON.stringify(result));
