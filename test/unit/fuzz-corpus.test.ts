/**
 * The kept fuzz corpus (test/fuzz-corpus/<parser>/): every crafted hostile input of issue 9 and
 * every minimized crash scripts/fuzz.ts found, replayed through its parser on every run, plus a
 * short seeded mutation run per parser. Each input must be accepted or refused with a
 * CloudletError, within seconds and bounded memory — never another exception. Package members
 * that are not plain files must always be refused.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FUZZ_TARGETS, mutate } from '../helpers/fuzz-targets.js';
import { repoRoot } from '../helpers/demo-vm.js';
import { rng } from '../helpers/rng.js';
import { CloudletError } from '../../src/util/errors.js';

const CORPUS = join(repoRoot(), 'test', 'fuzz-corpus');
const MUTATIONS_MS = 700;

for (const make of FUZZ_TARGETS) {
  const target = make();
  test(`fuzz corpus: ${target.name}`, async () => {
    try {
      const files = (await readdir(join(CORPUS, target.name)).catch(() => [] as string[])).sort();
      assert.ok(files.length > 0, `a corpus for ${target.name}`);
      for (const f of files) {
        const input = await readFile(join(CORPUS, target.name, f));
        const t0 = Date.now();
        const rss0 = process.memoryUsage().rss;
        let refused = false;
        try {
          await target.run(input);
        } catch (err) {
          if (!(err instanceof CloudletError)) throw new Error(`${target.name}/${f}: ${String(err)}`, { cause: err });
          refused = true;
        }
        assert.ok(Date.now() - t0 < 5000, `${target.name}/${f} took ${Date.now() - t0} ms`);
        assert.ok(process.memoryUsage().rss - rss0 < 256 << 20, `${target.name}/${f}: memory grew too much`);
        if (target.name === 'package-tar') assert.ok(refused, `package-tar/${f} must be refused`);
      }
      // A short mutation run from the seeds (scripts/fuzz.ts runs the long one).
      const seeds = await target.seeds();
      for (const s of seeds) await target.run(s);
      const rand = rng(Number(process.env.FUZZ_SEED ?? 9));
      const deadline = Date.now() + MUTATIONS_MS;
      let n = 0;
      while (Date.now() < deadline) {
        const input = mutate(seeds[n % seeds.length]!, rand, target.hotBytes);
        n++;
        try {
          await target.run(input);
        } catch (err) {
          if (!(err instanceof CloudletError)) {
            throw new Error(
              `${target.name} mutation ${n}: ${String(err)}; input ${input.subarray(0, 64).toString('hex')}`,
            );
          }
        }
      }
      assert.ok(n > 20, `${n} mutations`);
    } finally {
      await target.close?.();
    }
  });
}
