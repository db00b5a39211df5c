/**
 * Base packages: one base directory as a tar file (holes kept), optionally signed.
 *
 * Export: `tar --sparse` of bases/<id>, written under a temporary name and renamed into place;
 * with a signing key, `<id>/signature.json` (package-signature.ts) replaces any signature the
 * base came with; without one, a signature the base was imported with travels on.
 *
 * Import (untrusted input, in this order, nothing reaches the library before the last step):
 *  1. the package is a regular file; its members are listed by our own tar reader
 *     (package-tar.ts): only regular files and directories under one `<id>/`, sizes bounded;
 *  2. extracted into the library's tmp directory, then walked: still only files and directories;
 *  3. the manifest is parsed strictly (manifest.ts: closed fields, canonical file places, the VM
 *     spec against the closed list) and the files present are exactly the ones it names, at the
 *     sizes it names;
 *  4. the signature is checked against the trusted keys (refused when keys are configured and
 *     the package is unsigned or wrongly signed);
 *  5. every file is rehashed against the manifest, and the id against targets and spec;
 *  6. renamed into bases/<id>.
 */
import { constants } from 'node:fs';
import { lstat, mkdir, mkdtemp, open, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { checkOutputPath, syncDir, tempNameFor } from '../util/atomic.js';
import { onCleanup } from '../util/cleanup.js';
import { CloudletError, CorruptInputError, NoSpaceError, NotFoundError, classifyFsError } from '../util/errors.js';
import { findTool } from '../util/programs.js';
import { ownerTag } from '../util/owner.js';
import { silent, type Progress } from '../util/progress.js';
import type { SignatureStatus, SigningKey, TrustedKey } from '../util/sign.js';
import { specFiles } from '../spec/validate.js';
import { BLOB_FILES, MAX_MANIFEST, parseManifest, readManifestBytes, type BaseManifest } from './manifest.js';
import { fileReader, listPackage, type TarMember } from './package-tar.js';
import {
  MAX_SIGNATURE_FILE,
  SIGNATURE_FILE,
  parsePackageSignature,
  signManifest,
  verifyPackageSignature,
  type PackageSignature,
} from './package-signature.js';
import { verifyBase } from './library.js';
import { ANCHORS_FILE, baseDir, basesDir, mapFile, tmpDir } from './paths.js';

const ID = /^[0-9a-f]{64}$/;

export interface ExportOptions {
  sign?: SigningKey;
  /** Replace an existing package file. */
  force?: boolean;
}

/** Writes the base directory as one tar package (holes kept), atomically. */
export async function exportPackage(
  root: string,
  id: string,
  output: string,
  opts: ExportOptions = {},
): Promise<{ path: string; size: number; signed_by?: string }> {
  const dir = baseDir(root, id);
  const manifestBytes = await readManifestBytes(join(dir, 'manifest.json'));
  await checkOutputPath(output, opts.force ?? false);
  const temp = tempNameFor(output);
  let sigDir: string | undefined;
  const unregister = onCleanup(async () => {
    await rm(temp, { force: true });
    if (sigDir) await rm(sigDir, { recursive: true, force: true });
  });
  try {
    if (opts.sign) {
      await mkdir(tmpDir(root), { recursive: true });
      sigDir = await mkdtemp(join(tmpDir(root), `export-${ownerTag()}-`));
      await mkdir(join(sigDir, id));
      const sig = signManifest(manifestBytes, opts.sign);
      await writeFile(join(sigDir, id, SIGNATURE_FILE), JSON.stringify(sig, null, 2) + '\n');
      await tar(
        ['--sparse', '-cf', temp, '--anchored', `--exclude=${id}/${SIGNATURE_FILE}`, '-C', basesDir(root), id],
        output,
      );
      await tar(['-rf', temp, '-C', sigDir, `${id}/${SIGNATURE_FILE}`], output);
    } else {
      await tar(['--sparse', '-cf', temp, '-C', basesDir(root), id], output);
    }
    const h = await open(temp, 'r+');
    await h.sync();
    await h.close();
    await checkOutputPath(output, opts.force ?? false);
    await rename(temp, output);
    await syncDir(dirname(output));
    return {
      path: output,
      size: (await stat(output)).size,
      ...(opts.sign ? { signed_by: opts.sign.keyId } : {}),
    };
  } catch (err) {
    throw classifyFsError(err, output);
  } finally {
    await rm(temp, { force: true });
    if (sigDir) await rm(sigDir, { recursive: true, force: true });
    unregister();
  }
}

export interface PackageImportResult {
  id: string;
  added: boolean;
  signature: SignatureStatus;
}

/** Imports a package made by exportPackage, checking every byte (see the module comment). */
export async function importPackage(
  root: string,
  pkg: string,
  opts: { trust?: readonly TrustedKey[]; progress?: Progress } = {},
): Promise<PackageImportResult> {
  const progress = opts.progress ?? silent;
  const members = await listMembers(pkg);
  const id = packageId(members, pkg);
  await mkdir(tmpDir(root), { recursive: true });
  await mkdir(basesDir(root), { recursive: true });
  const work = await mkdtemp(join(tmpDir(root), `pkg-${ownerTag()}-`));
  const unregister = onCleanup(() => rm(work, { recursive: true, force: true }));
  try {
    await tar(['-xf', pkg, '-C', work, '--no-same-owner', '--no-same-permissions', '--no-overwrite-dir'], work);
    const dir = join(work, id);
    await checkTree(dir, members, id, pkg);
    const manifestBytes = await readManifestBytes(join(dir, 'manifest.json'));
    const manifest = parseManifest(manifestBytes, `${pkg}: manifest.json`);
    if (manifest.id !== id) throw new CorruptInputError(`${pkg}: the manifest is for base ${manifest.id}, not ${id}`);
    let sig: PackageSignature | undefined;
    if (members.some((m) => m.name === `${id}/${SIGNATURE_FILE}`)) {
      const bytes = await readSmall(join(dir, SIGNATURE_FILE), MAX_SIGNATURE_FILE, pkg);
      sig = parsePackageSignature(bytes, `${pkg}: ${SIGNATURE_FILE}`);
    }
    const signature = verifyPackageSignature(manifestBytes, sig, opts.trust ?? [], `package ${pkg}`);
    checkLayout(manifest, members, id, pkg);

    // Verify in place: a package is untrusted input.
    const fakeRoot = join(work, 'root');
    await mkdir(join(fakeRoot, 'bases'), { recursive: true });
    await rename(dir, join(fakeRoot, 'bases', id));
    const v = await verifyBase(fakeRoot, id, progress).catch((err: unknown) => {
      if (err instanceof CloudletError && !(err instanceof NoSpaceError)) {
        throw new CorruptInputError(`${pkg}: damaged base package: ${err.message}`, err.details);
      }
      throw err;
    });
    if (!v.ok) throw new CorruptInputError(`${pkg}: damaged base package: ${v.problems.join('; ')}`);
    const dest = baseDir(root, id);
    if (await stat(dest).catch(() => undefined)) return { id, added: false, signature };
    await rename(join(fakeRoot, 'bases', id), dest);
    await syncDir(basesDir(root));
    return { id, added: true, signature };
  } catch (err) {
    throw classifyFsError(err, work);
  } finally {
    await rm(work, { recursive: true, force: true });
    unregister();
  }
}

/** Step 1: the package is a regular file whose members are all files or directories. */
async function listMembers(pkg: string): Promise<TarMember[]> {
  let h;
  try {
    // O_NONBLOCK: a FIFO given as the package must not block the open.
    h = await open(pkg, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    throw new NotFoundError(`package ${pkg} cannot be read: ${(err as Error).message}`, { path: pkg });
  }
  try {
    const st = await h.stat();
    if (!st.isFile()) throw new NotFoundError(`${pkg} is not a regular file`, { path: pkg });
    return await listPackage(fileReader(h), st.size);
  } finally {
    await h.close();
  }
}

/** Every member sits in one `<id>/` directory. */
function packageId(members: readonly TarMember[], pkg: string): string {
  const tops = new Set(members.map((m) => m.name.split('/')[0]!));
  const id = tops.size === 1 ? [...tops][0]! : '';
  if (!ID.test(id))
    throw new CorruptInputError(`${pkg}: not a cloudlet-overlay base package (one <base id>/ directory)`);
  return id;
}

/** Step 2: what tar extracted is what was listed, files and directories only. */
async function checkTree(dir: string, members: readonly TarMember[], id: string, pkg: string): Promise<void> {
  const listed = new Map(members.map((m) => [m.name, m]));
  const st = await lstat(dir).catch(() => undefined);
  if (!st?.isDirectory()) throw new CorruptInputError(`${pkg}: no ${id}/ directory`);
  for (const e of await readdir(dir, { recursive: true, withFileTypes: true })) {
    const rel = `${id}/${relative(dir, join(e.parentPath, e.name))}`;
    const m = listed.get(rel);
    const ok = e.isFile() ? m?.type === 'file' : e.isDirectory() ? m === undefined || m.type === 'dir' : false;
    if (!ok) throw new CorruptInputError(`${pkg}: ${rel} is not a regular file or directory the package lists`);
    if (e.isFile() && (await lstat(join(e.parentPath, e.name))).size !== m?.size) {
      throw new CorruptInputError(`${pkg}: ${rel} does not have its listed size`);
    }
  }
}

/** Step 3: the files are exactly the base's (the manifest's list), at the sizes it names. */
function checkLayout(m: BaseManifest, members: readonly TarMember[], id: string, pkg: string): void {
  const want = new Map<string, number | undefined>([['manifest.json', undefined]]);
  const optional = new Set([SIGNATURE_FILE, ANCHORS_FILE]);
  const size = (kind: string, name: string): number | undefined =>
    m.targets.find((t) => t.kind === kind && t.name === name)?.size;
  if (m.disk) want.set(m.disk.file, m.disk.format === 'raw' ? m.disk.virtual_size : undefined);
  if (m.memory) {
    want.set(BLOB_FILES.prefix, size('blob', 'stream.prefix'));
    want.set(BLOB_FILES.start, size('blob', 'stream.start'));
    want.set(BLOB_FILES.tail, size('blob', 'stream.tail'));
    for (const [block, file] of Object.entries(m.memory.files)) want.set(file, size('ram', block));
  }
  for (const t of m.targets) if (t.kind !== 'blob') want.set(mapFile(t.kind, t.name), undefined);
  want.set(ANCHORS_FILE, undefined);
  for (const f of m.vm ? specFiles(m.vm) : []) want.set(f, m.vm_files?.[f]?.size);
  const files = members.filter((x) => x.type === 'file');
  const present = new Set<string>();
  for (const f of files) {
    const rel = f.name.slice(id.length + 1);
    if (!want.has(rel) && rel !== SIGNATURE_FILE) throw new CorruptInputError(`${pkg}: ${rel} is not a file of a base`);
    const expected = want.get(rel);
    if (expected !== undefined && f.size !== expected) {
      throw new CorruptInputError(`${pkg}: ${rel} is ${f.size} bytes, the manifest says ${expected}`);
    }
    if (rel === 'manifest.json' && f.size > MAX_MANIFEST) throw new CorruptInputError(`${pkg}: manifest too large`);
    present.add(rel);
  }
  for (const rel of want.keys()) {
    if (!present.has(rel) && !optional.has(rel)) throw new CorruptInputError(`${pkg}: ${rel} is missing`);
  }
}

async function readSmall(path: string, max: number, pkg: string): Promise<Buffer> {
  const h = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  try {
    const st = await h.stat();
    if (!st.isFile() || st.size > max) throw new CorruptInputError(`${pkg}: ${path} is not a small regular file`);
    return await h.readFile();
  } finally {
    await h.close();
  }
}

/** Runs tar; a failure is a corrupt package, a full disk a NoSpaceError naming `path`. */
async function tar(args: string[], path: string): Promise<void> {
  const program = await findTool('tar');
  const { execa } = await import('execa');
  const r = await execa(program, args, { reject: false, stdin: 'ignore', env: { LC_ALL: 'C' } });
  if (r.exitCode === 0) return;
  const last = (r.stderr || r.shortMessage || '').trim().split('\n').pop() ?? '';
  if (/No space left on device|Disk quota exceeded/.test(r.stderr)) {
    throw new NoSpaceError(`no space left on the device holding ${path}`, { path });
  }
  throw new CorruptInputError(`tar failed: ${last}`);
}
