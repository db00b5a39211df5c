/**
 * Seeded mutation fuzzing of the parser (~2 s): bit flips, byte overwrites, truncation,
 * insertions and deletions of a valid stream. Every input must either parse — and then every
 * read of it must work — or fail with a CloudletError; never another exception, never a hang.
 */
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { memorySnapshotFromBuffer } from '../../src/image/memory/index.js';
import { buildLibvirtHeader } from '../../src/image/memory/libvirt.js';
import { sampleStream } from '../helpers/synthetic-stream.js';
import { CloudletError } from '../../src/util/errors.js';
import { rng } from '../helpers/rng.js';

const BUDGET_MS = 2000;
const SEED = Number(process.env.MEMORY_FUZZ_SEED ?? 20240611);

function mutate(input: Buffer, rand: () => number, hotEnd: number): Buffer {
  const pick = (n: number): number => Math.floor(rand() * n);
  // Most of the stream is page payload, where any byte is valid; aim most mutations at the structure.
  const at = (): number => (rand() < 0.7 ? pick(Math.min(hotEnd, input.length)) : pick(input.length));
  let b = Buffer.from(input);
  const rounds = 1 + pick(4);
  for (let i = 0; i < rounds; i++) {
    switch (pick(6)) {
      case 0: {
        const p = at();
        b[p] = b[p]! ^ (1 << pick(8));
        break;
      }
      case 1:
        b[at()] = pick(256);
        break;
      case 2:
        b = b.subarray(0, at());
        break;
      case 3: {
        const p = at();
        b = Buffer.concat([
          b.subarray(0, p),
          Buffer.from([pick(256), pick(256), pick(256)].slice(0, 1 + pick(3))),
          b.subarray(p),
        ]);
        break;
      }
      case 4: {
        const p = at();
        b = Buffer.concat([b.subarray(0, p), b.subarray(p + 1 + pick(8))]);
        break;
      }
      case 5: {
        // an "interesting" 32-bit value over a length or offset field
        const p = at();
        const values = [0, 1, 0xfff, 0x1000, 0x7fffffff, 0x80000000, 0xffffffff];
        if (p + 4 <= b.length) b.writeUInt32BE(values[pick(values.length)]!, p);
        break;
      }
    }
    if (b.length === 0) break;
  }
  return b;
}

it('memory stream parser: mutated inputs end in a CloudletError or parse cleanly (bounded time)', async () => {
  const sample = sampleStream(11).bytes;
  const wrapped = Buffer.concat([buildLibvirtHeader('<domain/>', false), sample]);
  const rand = rng(SEED);
  const deadline = Date.now() + BUDGET_MS;
  let runs = 0;
  let parsed = 0;
  const codes = new Map<string, number>();
  while (Date.now() < deadline) {
    const useLibvirt = rand() < 0.2;
    const input = mutate(useLibvirt ? wrapped : sample, rand, useLibvirt ? 4096 + 600 : 600);
    runs++;
    try {
      // Small read sizes now and then, so refills land inside every kind of field.
      const s = await memorySnapshotFromBuffer(
        input,
        rand() < 0.3 ? { chunkSize: 1024 + Math.floor(rand() * 64) } : {},
      );
      parsed++;
      for (const b of s.blocks) {
        const src = s.block(b.name);
        const buf = Buffer.alloc(Math.min(src.size, 1 << 20));
        await src.read(0, buf.length, buf);
        await src.dataExtents();
        s.pages(b.name).counts();
      }
      await s.prefixBytes();
      await s.startSectionBytes();
      await s.tail();
    } catch (err) {
      if (!(err instanceof CloudletError)) {
        assert.fail(
          `seed ${SEED} run ${runs}: ${String(err)}\n` +
            `input (hex, first 256 bytes): ${input.subarray(0, 256).toString('hex')}`,
        );
      }
      codes.set(err.code, (codes.get(err.code) ?? 0) + 1);
    }
  }
  assert.ok(runs > 200, `only ${runs} runs in ${BUDGET_MS} ms`);
  assert.ok((codes.get('CorruptInputError') ?? 0) > 0);
  // Visible in the test output: how the budget was spent.
  process.stderr.write(
    `memory fuzz: ${runs} inputs, ${parsed} parsed, errors ${JSON.stringify(Object.fromEntries(codes))}\n`,
  );
});
