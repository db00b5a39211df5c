/**
 * Generated VM pairs for CLI-level tests: disk images made with qemu-img/qemu-io semantics in
 * plain files, and memory snapshots as QEMU 7.2 migration streams built page by page.
 */
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { deviceTail, pageRecord, ramSection, ramStartSection, streamHeader, zeroRecord } from './synthetic-stream.js';

export const PAGE = 4096;

/** A complete migration stream holding exactly these blocks (every page sent once). */
export function streamOf(blocks: Array<[string, Buffer]>, opts: { machine?: string; state?: Buffer } = {}): Buffer {
  const id = 2;
  const records: Buffer[] = [];
  let last = '';
  for (const [name, data] of blocks) {
    for (let p = 0; p < data.length / PAGE; p++) {
      const page = data.subarray(p * PAGE, (p + 1) * PAGE);
      const block = name === last ? null : name;
      last = name;
      records.push(page.equals(Buffer.alloc(PAGE)) ? zeroRecord(block, p) : pageRecord(block, p, Buffer.from(page)));
    }
  }
  return Buffer.concat([
    streamHeader({ machine: opts.machine ?? 'pc-q35-7.2' }),
    ramStartSection(
      id,
      blocks.map(([name, data]) => ({ name, length: data.length })),
    ),
    ramSection('end', id, records),
    deviceTail({ state: opts.state }),
  ]);
}

/** Deterministic PRNG (mulberry32). */
export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Text-like bytes: compressible, like file contents. */
export function textish(rand: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = 97 + Math.floor(rand() * 20);
  return b;
}

export function writeRaw(path: string, data: Buffer): void {
  writeFileSync(path, data);
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

/** Applies writes to an image through qemu-io (real qcow2 allocation, zero clusters, …). */
export function qemuIo(image: string, format: string, commands: string[]): void {
  execFileSync('qemu-io', ['-f', format, ...commands.flatMap((c) => ['-c', c]), image], { stdio: 'ignore' });
}
