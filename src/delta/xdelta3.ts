/**
 * xdelta3 (VCDIFF) through xdelta3-wasm. Its wasm module has a fixed 16 MiB heap: inputs above
 * ~1 MiB fail and above 8 MiB corrupt the module for the rest of the process, so this wrapper
 * only ever accepts chunk-sized pairs and checks every return code.
 */
import type * as Xd3Module from 'xdelta3-wasm';
import { CHUNK_SIZE } from './chunk.js';
import { CorruptInputError } from '../util/errors.js';

type Xd3 = typeof Xd3Module;

let ready: Promise<void> | undefined;
let xd3: Xd3 | undefined;

/** Loads the wasm module once (lazily: it costs start-up time); call before encode/decode. */
export function initXdelta3(): Promise<void> {
  ready ??= import('xdelta3-wasm').then(async (m) => {
    const mod = (m as unknown as { default?: Xd3 }).default ?? m;
    await mod.init();
    xd3 = mod;
  });
  return ready;
}

function lib(): Xd3 {
  if (!xd3) throw new Error('xdelta3: initXdelta3() was not awaited');
  return xd3;
}

function guard(n: number, what: string): void {
  if (n > CHUNK_SIZE) throw new RangeError(`xdelta3 wrapper: ${what} of ${n} bytes exceeds one chunk`);
}

/**
 * Encodes `target` against `source`; returns undefined when the delta would not be smaller
 * than `limit` bytes (not worth it) or xdelta3 reports an error.
 */
export function xdelta3Encode(target: Uint8Array, source: Uint8Array, limit: number): Buffer | undefined {
  guard(target.length, 'target');
  guard(source.length, 'source');
  const x = lib();
  const r = x.xd3_encode_memory(target, source, Math.max(16, limit), x.xd3_smatch_cfg.DEFAULT);
  if (r.ret !== 0) return undefined;
  return Buffer.from(r.output);
}

export function xdelta3Decode(delta: Uint8Array, source: Uint8Array, rawLength: number, where: string): Buffer {
  guard(source.length, 'source');
  if (delta.length > 2 * CHUNK_SIZE) {
    throw new CorruptInputError(`${where}: xdelta3 payload of ${delta.length} bytes is too large`);
  }
  let r: { ret: number; str: string; output: Uint8Array };
  try {
    r = lib().xd3_decode_memory(delta, source, rawLength);
  } catch (err) {
    throw new CorruptInputError(`${where}: xdelta3 delta does not decode (${(err as Error).message})`);
  }
  if (r.ret !== 0 || r.output.length !== rawLength) {
    throw new CorruptInputError(`${where}: xdelta3 delta does not decode (${r.str})`);
  }
  return Buffer.from(r.output);
}
