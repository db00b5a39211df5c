/**
 * A tiny generated VM pair (no QEMU) for the trust and resilience tests: a 4 MiB raw base disk,
 * a 2 MiB memory snapshot (pc.ram + pc.bios), a VM spec with a direct-boot "kernel", and a
 * customized disk and memory snapshot. importTiny() puts the base into a library.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { cli } from './cli.js';
import { PAGE, rng, streamOf, textish } from './synthetic-vm.js';

export interface TinyVm {
  dir: string;
  baseDisk: string;
  baseMem: string;
  vmJson: string;
  kernel: string;
  custDisk: string;
  custMem: string;
}

/** `ramMiB`: size of pc.ram (QEMU itself needs at least 16 for a resume, even a fake one). */
export async function makeTinyVm(dir: string, seed = 11, ramMiB = 2): Promise<TinyVm> {
  await mkdir(dir, { recursive: true });
  const rand = rng(seed);
  const disk = Buffer.alloc(4 << 20);
  textish(rand, 1 << 20).copy(disk, 1 << 20);
  const ram = Buffer.alloc(ramMiB << 20);
  textish(rand, 1 << 20).copy(ram, 0);
  const bios = textish(rand, 64 << 10);
  const t: TinyVm = {
    dir,
    baseDisk: join(dir, 'base.raw'),
    baseMem: join(dir, 'base.mem'),
    vmJson: join(dir, 'vm.json'),
    kernel: join(dir, 'vmlinuz'),
    custDisk: join(dir, 'cust.raw'),
    custMem: join(dir, 'cust.mem'),
  };
  await writeFile(t.baseDisk, disk);
  await writeFile(
    t.baseMem,
    streamOf([
      ['pc.ram', ram],
      ['pc.bios', bios],
    ]),
  );
  await writeFile(t.kernel, textish(rand, 8192));
  await writeFile(
    t.vmJson,
    JSON.stringify({
      machine: 'pc-q35-7.2',
      memoryMiB: ramMiB,
      kernel: t.kernel,
      append: 'console=ttyS0',
      drives: [{ file: 'x', format: 'raw', if: 'virtio' }],
      network: { model: 'virtio-net-pci', romfile: '', forwards: [] },
    }),
  );
  const cram = Buffer.from(ram);
  cram.fill(0x33, 5 * PAGE, 9 * PAGE);
  await writeFile(
    t.custMem,
    streamOf([
      ['pc.ram', cram],
      ['pc.bios', bios],
    ]),
  );
  const cdisk = Buffer.from(disk);
  cdisk.write('customized', (1 << 20) + 5000); // inside the base's data: a delta record
  await writeFile(t.custDisk, cdisk);
  return t;
}

/** Imports the tiny base into the library of `env`; returns its id. */
export async function importTiny(t: TinyVm, env: NodeJS.ProcessEnv, name = 'tiny'): Promise<string> {
  const r = await cli(
    ['base', 'import', '--disk', t.baseDisk, '--memory', t.baseMem, '--vm', t.vmJson, '--name', name],
    env,
  );
  if (r.code !== 0) throw new Error(`base import failed (${r.code}): ${r.stderr}`);
  return String(r.json.id);
}

/** create of the tiny pair against library base `base`, extra flags appended. */
export async function createTiny(
  t: TinyVm,
  env: NodeJS.ProcessEnv,
  out: string,
  extra: string[] = [],
  base = 'tiny',
): Promise<void> {
  const r = await cli(
    ['create', '--base', base, '--disk', t.custDisk, '--memory', t.custMem, '-o', out, ...extra],
    env,
  );
  if (r.code !== 0) throw new Error(`create failed (${r.code}): ${r.stderr}`);
}
