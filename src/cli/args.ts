/** A small argv parser: declared options per command, typed results, usage errors. */

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

export interface OptionSpec {
  /** Long name without dashes. */
  name: string;
  short?: string;
  /** Takes a value (--name VALUE or --name=VALUE). */
  value?: boolean;
  /** May be given more than once (values collected). */
  repeat?: boolean;
  help: string;
  /** Shown in help in place of VALUE. */
  meta?: string;
}

export interface Parsed {
  options: Map<string, string[]>;
  positional: string[];
}

export function parseArgs(argv: string[], specs: OptionSpec[]): Parsed {
  const options = new Map<string, string[]>();
  const positional: string[] = [];
  const byLong = new Map(specs.map((s) => [s.name, s]));
  const byShort = new Map(specs.filter((s) => s.short).map((s) => [s.short!, s]));
  const put = (spec: OptionSpec, v: string) => {
    const list = options.get(spec.name) ?? [];
    if (list.length > 0 && !spec.repeat) throw new UsageError(`option --${spec.name} given twice`);
    list.push(v);
    options.set(spec.name, list);
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = a.slice(2, eq < 0 ? undefined : eq);
      const spec = byLong.get(name);
      if (!spec) throw new UsageError(`unknown option --${name}`);
      if (spec.value) {
        const v = eq >= 0 ? a.slice(eq + 1) : argv[++i];
        if (v === undefined) throw new UsageError(`option --${name} needs a value`);
        put(spec, v);
      } else {
        if (eq >= 0) throw new UsageError(`option --${name} takes no value`);
        put(spec, '');
      }
    } else if (a.startsWith('-') && a.length > 1) {
      const spec = byShort.get(a.slice(1, 2));
      if (!spec) throw new UsageError(`unknown option ${a}`);
      if (spec.value) {
        const v = a.length > 2 ? a.slice(2) : argv[++i];
        if (v === undefined) throw new UsageError(`option -${spec.short} needs a value`);
        put(spec, v);
      } else {
        if (a.length > 2) throw new UsageError(`unknown option ${a}`);
        put(spec, '');
      }
    } else {
      positional.push(a);
    }
  }
  return { options, positional };
}

export function flag(p: Parsed, name: string): boolean {
  return p.options.has(name);
}

export function value(p: Parsed, name: string): string | undefined {
  return p.options.get(name)?.[0];
}

export function values(p: Parsed, name: string): string[] {
  return p.options.get(name) ?? [];
}

export function formatOptions(specs: OptionSpec[]): string {
  const rows = specs.map((s) => {
    const left = `${s.short ? `-${s.short}, ` : '    '}--${s.name}${s.value ? ` ${s.meta ?? 'VALUE'}` : ''}`;
    return [left, s.help] as const;
  });
  const w = Math.max(...rows.map((r) => r[0].length), 10);
  return rows.map(([l, h]) => `  ${l.padEnd(w)}  ${h}`).join('\n');
}
