/**
 * Generated VM pairs for CLI-level tests: disk images made with qemu-img/qemu-io semantics in
 * plain files, and memory snapshots as QEMU 7.2 migration streams built page by page.
 */
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { deviceTail, pageRecord, ramSection, ramStartSection, streamHeader, zeroRecord } from './synthetic-stream.js';

export { rng, textish } from './rng.js';

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
